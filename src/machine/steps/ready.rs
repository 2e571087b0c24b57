//! Step `ready`: the guest is where its record wants it, within the readiness deadline.
//!
//! - An ordinary machine: the guest init said it is ready (the workload runs and listens
//!   on every port the spec declares), and the host has seen each declared port accept a
//!   TCP connection at the guest's address. The guest's word alone is not enough: a
//!   guest is untrusted, and its route must not be published to a port nobody serves.
//! - A pool's prepared machine: the guest init said it is idle (booted, network up, no
//!   workload), and the VMM is then paused, so prepared capacity costs no CPU.
//! - A machine claimed from a pool: the VMM is resumed and the workload — composed from
//!   the claimed spec and the image as a cold create's config disk would carry it — goes
//!   to the guest with the host's wall-clock time and fresh entropy; then as an ordinary
//!   machine.
//!
//! Acquire is safe to run any number of times, after a daemon restart too: waits only
//! ask the guest for its state; a pause or a resume of a VMM already so is a no-op; and
//! a guest starts a workload only from `Idle`, so a claim sent again starts nothing
//! twice (a claimed guest that rebooted is idle again and gets it anew). When the guest
//! stays silent past the deadline, or the VMM exits early, or a declared port does not
//! accept a connection by the deadline, the step fails and the run counts a boot attempt.
//! The port check opens and at once closes one connection per port (retried while
//! refused), as a health check would. Release has no host effect.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::time::Instant;

use super::{Cause, Owned, StepContext, StepError};
use crate::guest::protocol::{Claim, claim_entropy};
use crate::machine::record::MachineRecord;
use crate::machine::step::Step;
use crate::vmm::ReadyError;

/// Longest single connection attempt of the port check (a dropped packet, not a refusal).
const CONNECT_ATTEMPT: Duration = Duration::from_secs(1);
/// First pause between refused attempts; it doubles up to [`PORT_RETRY_MAX`].
const PORT_RETRY_MIN: Duration = Duration::from_millis(20);
/// Longest pause between refused attempts.
const PORT_RETRY_MAX: Duration = Duration::from_millis(500);

/// Waits for the guest to be where the record wants it (see the module doc).
pub async fn acquire(cx: &impl StepContext, rec: &MachineRecord) -> Result<(), StepError> {
    let record = rec
        .resources
        .vmm
        .as_ref()
        .ok_or(StepError::Retry(Cause::NotRecorded {
            step: Step::Ready,
            what: "VMM",
        }))?;
    let process = super::vmm::process_of(record);
    let deadline = Instant::now() + cx.ready_timeout();
    let failed = |e| StepError::Retry(Cause::Ready(e));
    let control = |action| move |source| StepError::Retry(Cause::Control { action, source });
    if rec.pool_owner().is_some() {
        // Run again after a crash between the pause and its record, the guest would be
        // paused and could not answer: it is resumed first (a no-op when it runs).
        cx.resume(&process).await.map_err(control("resume"))?;
        cx.wait_idle(&process, cx.ready_timeout())
            .await
            .map_err(failed)?;
        cx.pause(&process).await.map_err(control("pause"))?;
        return Ok(());
    }
    if rec.claimed() {
        cx.resume(&process).await.map_err(control("resume"))?;
        let workload = super::vm_config::guest_config(cx, rec)?;
        let entropy = claim_entropy().map_err(|e| StepError::Retry(Cause::Entropy(e)))?;
        let claim = Claim::from_config(&workload, crate::machine::now_ms(), entropy);
        cx.claim(&process, &claim, cx.ready_timeout())
            .await
            .map_err(|e| match e {
                ReadyError::ClaimTooLarge { .. } => StepError::Permanent(Cause::ClaimTooLarge(e)),
                other => failed(other),
            })?;
        return ports_accept(cx, rec, deadline).await;
    }
    cx.wait_ready(&process, cx.ready_timeout())
        .await
        .map_err(failed)?;
    ports_accept(cx, rec, deadline).await
}

/// Waits until every port the spec declares accepts a TCP connection at the guest's
/// address, trying each again while it refuses, until `deadline`.
async fn ports_accept(
    cx: &impl StepContext,
    rec: &MachineRecord,
    deadline: Instant,
) -> Result<(), StepError> {
    let mut ports = rec.spec.ports.clone();
    ports.sort_unstable();
    ports.dedup();
    if ports.is_empty() {
        return Ok(());
    }
    let ip = rec
        .resources
        .guest_ip
        .ok_or(StepError::Retry(Cause::NotRecorded {
            step: Step::Ready,
            what: "guest address",
        }))?;
    for port in ports {
        port_accepts(cx, ip, port, deadline).await?;
    }
    Ok(())
}

/// One declared port: connects until one connection is accepted or `deadline` passes.
async fn port_accepts(
    cx: &impl StepContext,
    ip: Ipv4Addr,
    port: u16,
    deadline: Instant,
) -> Result<(), StepError> {
    let addr = SocketAddr::from((ip, port));
    let started = Instant::now();
    let mut pause = PORT_RETRY_MIN;
    let mut attempts = 0u32;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        attempts += 1;
        let last = match cx.tcp_connect(addr, left.min(CONNECT_ATTEMPT)).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if Instant::now() + pause >= deadline {
            return Err(StepError::Retry(Cause::PortClosed {
                ip,
                port,
                waited: started.elapsed(),
                attempts,
                last,
            }));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(PORT_RETRY_MAX);
    }
}

/// What the step owns by name: nothing (a wait).
pub fn owned(_: &impl StepContext, _: &MachineRecord) -> Vec<Owned> {
    Vec::new()
}

/// What a finished release forgets on the record: nothing (the step records nothing).
pub fn forget(_: &mut MachineRecord) {}

/// The probe: nothing to look at.
pub fn probe(_: &impl StepContext, _: &MachineRecord) -> bool {
    true
}

/// Nothing to undo.
pub async fn release(_: &impl StepContext, _: &MachineRecord) -> Result<(), StepError> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::super::testing::{FakeHost, check_contract};
    use crate::machine::record::Pooled;
    use crate::machine::step::Step;

    #[tokio::test]
    async fn keeps_the_contract_and_fails_when_the_vmm_is_gone() {
        let (host, mut rec) = check_contract(Step::Ready, None).await;
        let pid = rec.resources.vmm.as_ref().expect("vmm").pid;
        host.kill_vmm(pid);
        let err = host.acquire(Step::Ready, &mut rec).await.unwrap_err();
        assert!(
            !err.is_permanent() && err.to_string().contains("exited"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_declared_port_must_accept_before_the_guest_is_believed() {
        let host = FakeHost::new();
        let mut rec = host.record();
        rec.spec.ports = vec![8080];
        host.acquire_before(Step::Ready, &mut rec).await;
        let err = host.acquire(Step::Ready, &mut rec).await.unwrap_err();
        assert!(err.to_string().contains("port 8080"), "{err}");
        let ip = rec.resources.guest_ip.expect("ip");
        host.listen(SocketAddr::from((ip, 8080)));
        host.acquire(Step::Ready, &mut rec).await.expect("ready");
    }

    #[tokio::test]
    async fn a_prepared_guest_is_left_paused_and_a_claim_resumes_it_once() {
        let host = FakeHost::new();
        let mut rec = host.record();
        rec.pooled = Some(Pooled {
            pool: "p".into(),
            claimed: false,
        });
        host.acquire_before(Step::Ready, &mut rec).await;
        host.acquire(Step::Ready, &mut rec).await.expect("prepared");
        let pid = rec.resources.vmm.as_ref().expect("vmm").pid;
        assert_eq!(host.running_vmms(), [(pid, true)]);
        // Again (a restart between the pause and its record): resumed, idle, paused.
        host.acquire(Step::Ready, &mut rec)
            .await
            .expect("prepared again");
        assert_eq!(host.running_vmms(), [(pid, true)]);
        assert_eq!(host.claims(), 0);

        rec.pooled = Some(Pooled {
            pool: "p".into(),
            claimed: true,
        });
        host.acquire(Step::Ready, &mut rec).await.expect("claimed");
        assert_eq!(host.running_vmms(), [(pid, false)]);
        assert_eq!(host.claims(), 1);
        host.release(Step::Ready, &mut rec).await.expect("release");
        assert_eq!(host.running_vmms(), [(pid, false)], "release has no effect");
    }
}
