//! One machine's lifecycle: the durable record, the pure decision, the steps, and the
//! actor that runs them.
//!
//! ```text
//!                 CreateMachine                       DestroyMachine (from any state)
//!                      |                                       |
//!                      v                                       v
//!   created --> starting --acquire steps--> started --> stopping --> stopped
//!                  |  ^                        |   (release publish,   |
//!                  |  +---- StartMachine ------+----  ready, vmm) <----+
//!                  |
//!                  +-- boot attempts exhausted / step keeps failing --> failed
//!                                                  (every acquired step released)
//!   any --DestroyMachine--> destroying (release every touched step, in reverse) --> destroyed
//! ```
//!
//! The create order is declared once in [`step::CREATE_ORDER`]; teardown is its reverse.
//! Each step is marked `Begun` durably before its effect runs and `Done` after, so a crash
//! at any point leaves a record from which [`decide::decide`] picks the next safe step:
//! a `Begun` step is run again (every effect is idempotent) or released (every undo works
//! on a half-done effect). A run of acquires is marked in one commit and recorded in
//! one ([`decide::run_of`]); that keeps the rule, as each effect still starts after its
//! mark is durable.
//!
//! The domain rules beside the lifecycle are pure functions here too: admission
//! ([`admission`]) and prepared capacity's matching and claims ([`claim`]).

pub mod admission;
pub mod claim;
pub mod decide;
pub mod record;
pub(crate) mod record_v1;
pub mod spec;
pub mod step;
pub mod steps;
pub mod workload;

/// Wall clock in ms since the epoch: recorded for people and handed to a claimed guest as
/// its time, never used to decide.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
