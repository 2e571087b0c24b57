//! The stop sequence both drivers share: ask the guest, then ask the VMM, then kill.
//!
//! Each stage waits for the process's exit through its pidfd (never a reused pid), and
//! the outcome says whether the guest got to shut itself down. A process this daemon
//! started is reaped before the stop returns, so no zombie is left.

use std::future::Future;
use std::time::Duration;

use super::agent::{self, AgentLink};
use super::spawn::Children;
use super::{StopError, StopOutcome, VmmProcess, pidfd};

/// How long the VMM may take to exit after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// The VMM's own way to end the guest (stage 2), how long to give it, and whether an exit
/// after it counts as graceful (Ctrl-Alt-Del lets the guest shut down; QMP `quit` does
/// not).
pub struct VmmStage<F> {
    /// The request (errors are ignored: stage 3 follows anyway).
    pub request: F,
    /// How long to wait for the exit after it.
    pub wait: Duration,
    /// Whether an exit after it lets the guest shut down.
    pub graceful: bool,
}

/// Stops `process`: the agent's Shutdown within `grace`, then `vmm_stage`, then SIGKILL.
///
/// Idempotent: a process already gone is `graceful: true`.
pub async fn stop<F: Future<Output = ()>>(
    process: &VmmProcess,
    grace: Duration,
    link: AgentLink,
    children: &Children,
    vmm_stage: VmmStage<F>,
) -> Result<StopOutcome, StopError> {
    let Some(fd) = pidfd::open_verified(process) else {
        children.reaped(process.pid).await;
        return Ok(StopOutcome { graceful: true });
    };
    let signal_err = |source| StopError::Signal {
        pid: process.pid,
        source,
    };
    let fd = pidfd::watch(fd).map_err(signal_err)?;

    // 1. The guest shuts itself down (workload stopped, disks synced, halted).
    let graceful = tokio::time::timeout(grace, async {
        let _ = agent::request_shutdown(link, grace).await;
        pidfd::wait_exit(&fd).await;
    })
    .await
    .is_ok();
    if graceful {
        children.reaped(process.pid).await;
        return Ok(StopOutcome { graceful: true });
    }

    // 2. The VMM's own way.
    vmm_stage.request.await;
    if pidfd::exited_within(&fd, vmm_stage.wait).await {
        children.reaped(process.pid).await;
        return Ok(StopOutcome {
            graceful: vmm_stage.graceful,
        });
    }

    // 3. SIGKILL.
    pidfd::kill(&fd).map_err(signal_err)?;
    if pidfd::exited_within(&fd, KILL_WAIT).await {
        children.reaped(process.pid).await;
        return Ok(StopOutcome { graceful: false });
    }
    Err(StopError::StillRunning {
        pid: process.pid,
        after: KILL_WAIT,
    })
}
