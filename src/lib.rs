//! hearth: the worker daemon of a microVM platform.
//!
//! `hearthd` turns machine requests from a control plane into running, reachable microVMs
//! and keeps each machine's lifecycle as a durable state machine. See `actors.md` for the
//! architecture: the actor tree, who owns what, and the invariants.

pub mod actors;
pub mod admit;
pub mod api;
pub mod audit;
pub mod client;
pub mod config;
pub mod dns;
pub mod elf;
pub mod failpoints;
pub mod guest;
pub mod heap;
pub mod host;
pub mod image;
pub mod layout;
pub mod machine;
pub mod machine_id;
pub mod metrics;
pub mod net;
pub mod route;
pub mod sinks;
pub mod store;
pub mod text;
pub mod vmm;
pub mod vmmdir;
