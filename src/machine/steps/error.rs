//! Why a step failed. A failure says what failed in a form callers can match (a
//! [`Cause`], holding the source error where there is one), and its class says whether
//! trying again can help ([`StepError`]). Its message is what the machine's history and
//! step timings show.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use super::Step;
use crate::guest::config::WriteConfigError;
use crate::image::{CloneError, ImageRefError, OverlayError};
use crate::machine::workload::NothingToRun;
use crate::net::{NetError, PlanError};
use crate::vmm::cgroup::CgroupError;
use crate::vmm::marked::KillError;
use crate::vmm::{ControlError, LaunchError, ReadyError, StopError};

/// Why a step's effect failed, and whether trying again can help.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// Transient (a singleton restarting, the host busy, a registry unreachable): the run
    /// tries again after a backoff, a bounded number of times.
    #[error(transparent)]
    Retry(Cause),
    /// Can never succeed for this record: the machine fails at once, naming the cause.
    #[error(transparent)]
    Permanent(Cause),
}

impl StepError {
    /// True when trying again cannot help.
    pub fn is_permanent(&self) -> bool {
        matches!(self, StepError::Permanent(_))
    }

    /// What failed.
    pub fn cause(&self) -> &Cause {
        match self {
            StepError::Retry(cause) | StepError::Permanent(cause) => cause,
        }
    }
}

/// What failed in a step.
#[derive(Debug, thiserror::Error)]
pub enum Cause {
    /// An earlier step's output that `step` needs is missing from the record.
    #[error("{step}: no {what} recorded")]
    NotRecorded {
        /// The step that needs it.
        step: Step,
        /// What is missing.
        what: &'static str,
    },
    /// A file call on the host.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The system error.
        source: std::io::Error,
    },
    /// A blocking task ended without an answer (it panicked, or the runtime is going).
    #[error("{work} task: {source}")]
    Task {
        /// Whose work it ran.
        work: &'static str,
        /// How it ended.
        source: tokio::task::JoinError,
    },
    /// The machine's image reference does not parse.
    #[error(transparent)]
    ImageRef(ImageRefError),
    /// The spec and the image give nothing to run.
    #[error(transparent)]
    Workload(NothingToRun),
    /// The machine's network plan cannot be derived.
    #[error("network plan: {0}")]
    Plan(#[source] PlanError),
    /// The machine's disk could not be copied or removed (`copy` layout, and removal).
    #[error(transparent)]
    Disk(CloneError),
    /// The machine's overlay disks could not be made.
    #[error(transparent)]
    Overlay(OverlayError),
    /// The overlay's link to the base cannot cross file systems.
    #[error(
        "{0}: images.disk_layout = \"overlay\" needs the image cache and the machine \
         directories on one file system; set it to \"copy\""
    )]
    OverlayAcrossFileSystems(#[source] OverlayError),
    /// The config disk could not be written.
    #[error(transparent)]
    GuestConfig(WriteConfigError),
    /// The workload is larger than the config disk holds.
    #[error("vm_config: the workload does not fit the guest config: {0}")]
    ConfigTooLarge(#[source] WriteConfigError),
    /// The host network or the packet policy.
    #[error(transparent)]
    Net(NetError),
    /// The machine's cgroup.
    #[error(transparent)]
    Cgroup(CgroupError),
    /// The VMM could not be started.
    #[error(transparent)]
    Launch(LaunchError),
    /// The VMM could not be stopped.
    #[error(transparent)]
    Stop(StopError),
    /// A VMM that carries the machine's marker but is not recorded could not be ended.
    #[error(transparent)]
    Unrecorded(KillError),
    /// The guest did not get where the record wants it.
    #[error("ready: {0}")]
    Ready(#[source] ReadyError),
    /// The claimed workload is larger than a claim carries.
    #[error("ready: the workload does not fit a claim: {0}")]
    ClaimTooLarge(#[source] ReadyError),
    /// The VMM's control API refused a pause or a resume.
    #[error("ready: {action}: {source}")]
    Control {
        /// `pause` or `resume`.
        action: &'static str,
        /// The VMM's answer.
        source: ControlError,
    },
    /// The host gave no entropy for a claim.
    #[error("ready: no entropy for the claim: {0}")]
    Entropy(#[source] getrandom::Error),
    /// The guest said it is ready, but a declared port did not accept a connection by the
    /// deadline.
    #[error(
        "ready: the guest said it is ready, but port {port} at {ip} did not accept a \
         connection within {:.1} s ({attempts} attempts; last: {last})",
        .waited.as_secs_f64()
    )]
    PortClosed {
        /// The guest's address.
        ip: Ipv4Addr,
        /// The port.
        port: u16,
        /// How long it was tried.
        waited: Duration,
        /// How many connections were attempted.
        attempts: u32,
        /// Why the last attempt failed.
        last: String,
    },
    /// The store could not lease or free the machine's address block (its message: the
    /// store stands on `machine`, so its error type is not named here).
    #[error("{0}")]
    Lease(String),
    /// A host call did not answer within its deadline.
    #[error("{what} did not answer within {waited:?}")]
    Timeout {
        /// What was asked.
        what: String,
        /// How long it was given.
        waited: Duration,
    },
    /// A part of the daemon above the steps (a singleton, the image cache, the guest kit)
    /// answered with a failure, as text.
    #[error("{0}")]
    Service(String),
    /// The in-memory test host broke a call on purpose.
    #[cfg(test)]
    #[error("{0}: broken on purpose")]
    Broken(&'static str),
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;

    #[test]
    fn messages_name_the_step_the_object_and_the_figures() {
        let cases = [
            (
                Cause::NotRecorded {
                    step: Step::Disk,
                    what: "base image",
                },
                "disk: no base image recorded",
            ),
            (
                Cause::Io {
                    action: "remove",
                    path: "/m/0123456789".into(),
                    source: io::ErrorKind::PermissionDenied.into(),
                },
                "remove /m/0123456789: permission denied",
            ),
            (
                Cause::PortClosed {
                    ip: Ipv4Addr::new(10, 0, 0, 2),
                    port: 8080,
                    waited: Duration::from_millis(1300),
                    attempts: 3,
                    last: "connection refused".into(),
                },
                "ready: the guest said it is ready, but port 8080 at 10.0.0.2 did not accept a \
                 connection within 1.3 s (3 attempts; last: connection refused)",
            ),
            (
                Cause::OverlayAcrossFileSystems(OverlayError::Io {
                    path: "/m/base.ext4".into(),
                    what: "link",
                    source: io::ErrorKind::CrossesDevices.into(),
                }),
                "/m/base.ext4: link: cross-device link or rename: images.disk_layout = \
                 \"overlay\" needs the image cache and the machine directories on one file \
                 system; set it to \"copy\"",
            ),
        ];
        for (cause, message) in cases {
            assert_eq!(StepError::Retry(cause).to_string(), message);
        }
    }
}
