//! The VMM driver contract and its implementations.
