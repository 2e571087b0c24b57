//! The steps' context (`machine::steps::StepContext`), implemented over the shared
//! services. A resource with a singleton (the image cache, the route registry) is
//! reached by a call to it, found by its registered name, so a restarted singleton is
//! reached without a stale reference; a call nobody answers is transient
//! ([`StepError::Retry`]). The rest is reached directly, because what serialises it is
//! already below: the store's write transaction (the leases), the network fabric's
//! worker threads (namespaces, links, the packet policy), the cgroup files and the
//! VMM driver (one machine's, called by its own run only). A singleton's refusal arrives
//! as text ([`Cause::Service`]), and so does the store's ([`Cause::Lease`]).

use std::path::PathBuf;
use std::time::Duration;

use super::registry::RegistryMsg;
use super::rootfs_cache::RootfsMsg;
use super::services::Services;
use super::{AskError, ask, names};
use crate::guest::config::GuestResolver;
use crate::guest::kit::GuestKit;
use crate::guest::protocol::Claim;
use crate::image::ImageRef;
use crate::machine::step::ResourceKind;
use crate::machine::steps::{BaseFound, Cause, Owned, StepContext, StepError};
use crate::net::NetPlan;
use crate::net::policy::MachinePolicy;
use crate::route::Route;
use crate::vmm::cgroup::{CgroupError, Limits};
use crate::vmm::{Confinement, ControlError, LaunchSpec, Liveness, ReadyError, VmmProcess};

/// Building a base can take a while (unpacking, mkfs).
const BUILD_TIMEOUT: Duration = Duration::from_secs(600);
/// A route is one commit.
const TABLE_TIMEOUT: Duration = Duration::from_secs(10);
/// A namespace with its links and tap.
const NETWORK_TIMEOUT: Duration = Duration::from_secs(30);

impl From<AskError> for StepError {
    fn from(e: AskError) -> Self {
        refused(e.to_string())
    }
}

/// A failure a singleton (or the guest kit) answered as text: transient.
fn refused(message: String) -> StepError {
    StepError::Retry(Cause::Service(message))
}

impl StepContext for Services {
    fn machine_dir(&self, id: &str) -> PathBuf {
        self.config().machine_dir(id)
    }

    fn net_plan(&self, id: &str, slot: u32) -> Result<NetPlan, StepError> {
        NetPlan::derive(&self.config().network.prefix, id, *self.pool(), slot)
            .map_err(|e| StepError::Retry(Cause::Plan(e)))
    }

    fn exists(&self, object: &Owned) -> Option<bool> {
        let name = object.name.as_str();
        match object.kind {
            ResourceKind::Netns => Some(crate::net::netns_path(name).exists()),
            ResourceKind::Link => Some(std::path::Path::new("/sys/class/net").join(name).exists()),
            ResourceKind::MachineDir => Some(std::path::Path::new(name).is_dir()),
            // One netlink query; a failed one tells nothing.
            ResourceKind::Policy => {
                crate::net::NetFabric::policy_present(&self.config().network.prefix, name).ok()
            }
            ResourceKind::Cgroup => Some(self.vmm_host().cgroups.present(name)),
            // Processes and store rows are not probed by name.
            ResourceKind::Vmm | ResourceKind::Lease | ResourceKind::Route => None,
        }
    }

    fn upper_templates(&self) -> PathBuf {
        self.config().uppers_dir()
    }

    fn guest_resolver(&self) -> Option<GuestResolver> {
        // Only a resolver that is answering: when its address could not be bound, guests
        // keep their image's resolv.conf rather than wait on a server that is not there.
        let bound = self.listening().guest_dns?;
        let std::net::IpAddr::V4(nameserver) = bound.ip() else {
            return None;
        };
        Some(GuestResolver {
            nameserver,
            search: self.config().dns.domain.trim_end_matches('.').to_string(),
        })
    }

    fn ready_timeout(&self) -> Duration {
        self.config().ready_timeout()
    }

    async fn kit(&self) -> Result<GuestKit, StepError> {
        Services::kit(self).await.cloned().map_err(refused)
    }

    async fn ensure_base(&self, image: ImageRef) -> Result<BaseFound, StepError> {
        let found = ask(
            names::ROOTFS_CACHE,
            |reply| RootfsMsg::EnsureBase {
                image,
                progress: None,
                reply,
            },
            BUILD_TIMEOUT,
        )
        .await?
        .map_err(|e| {
            let cause = Cause::Service(e.to_string());
            if e.is_permanent() {
                StepError::Permanent(cause)
            } else {
                StepError::Retry(cause)
            }
        })?;
        Ok(BaseFound {
            digest: found.base.digest,
            path: found.base.path,
            workload: found.workload,
        })
    }

    // A lease is one write transaction of the store, which serialises writers and answers
    // a machine with the block it already holds: no actor stands in between.
    async fn lease(&self, machine: &str) -> Result<u32, StepError> {
        let slot = self
            .store()
            .lease(machine, self.lease_slots())
            .map_err(|e| StepError::Retry(Cause::Lease(e.to_string())))?;
        crate::failpoints::hit("leases.lease.after_commit");
        Ok(slot)
    }

    async fn release_lease(&self, machine: &str) -> Result<(), StepError> {
        self.store()
            .release_lease(machine)
            .map(|_| ())
            .map_err(|e| StepError::Retry(Cause::Lease(e.to_string())))
    }

    // The fabric's worker threads run one namespace's changes in order and different
    // machines' in parallel (a slow teardown holds up no other create): no actor stands
    // in between.
    async fn ensure_network(&self, plan: NetPlan) -> Result<(), StepError> {
        crate::failpoints::hit("fabric.ensure.before_effect");
        network_call(&plan, self.net().ensure(&plan)).await
    }

    async fn remove_network(&self, plan: NetPlan) -> Result<(), StepError> {
        network_call(&plan, self.net().remove(&plan)).await
    }

    // The policy is per machine and the fabric's workers order each machine's calls, so
    // no singleton stands in between.
    async fn ensure_policy(&self, machine: MachinePolicy) -> Result<(), StepError> {
        self.net()
            .ensure_policy(machine)
            .await
            .map_err(|e| StepError::Retry(Cause::Net(e)))
    }

    async fn remove_policy(&self, machine: &str) -> Result<(), StepError> {
        self.net()
            .remove_policy(&self.config().network.prefix, machine)
            .await
            .map_err(|e| StepError::Retry(Cause::Net(e)))
    }

    async fn ensure_cgroup(
        &self,
        machine: &str,
        vcpus: u32,
        memory_mib: u32,
        running: Option<i32>,
    ) -> Result<(), StepError> {
        let cgroups = self.vmm_host().cgroups.clone();
        let overhead = u64::from(self.config().vmm.memory_overhead_mib);
        let limits = Limits {
            vcpus,
            memory_bytes: (u64::from(memory_mib) + overhead) << 20,
        };
        let id = machine.to_string();
        blocking(move || {
            cgroups.ensure(&id, limits)?;
            // A VMM that is gone has nothing to move; its step notices that itself.
            if let Some(pid) = running
                && std::path::Path::new(&format!("/proc/{pid}")).exists()
            {
                cgroups.add(&id, pid)?;
            }
            Ok(())
        })
        .await
    }

    async fn remove_cgroup(&self, machine: &str) -> Result<(), StepError> {
        let cgroups = self.vmm_host().cgroups.clone();
        let id = machine.to_string();
        blocking(move || cgroups.remove(&id)).await
    }

    fn keep_logs(&self, machine: &str, process: &VmmProcess) {
        Services::keep_logs(self, machine, process);
    }

    async fn launch(&self, spec: LaunchSpec) -> Result<VmmProcess, StepError> {
        self.vmm()
            .launch(&spec)
            .await
            .map_err(|e| StepError::Retry(Cause::Launch(e)))
    }

    fn liveness(&self, process: &VmmProcess) -> Liveness {
        self.vmm().liveness(process)
    }

    async fn stop_vmm(&self, process: VmmProcess) -> Result<(), StepError> {
        self.vmm()
            .stop(&process, self.config().stop_grace())
            .await
            .map(|_| ())
            .map_err(|e| StepError::Retry(Cause::Stop(e)))
    }

    async fn kill_unrecorded(&self, machine: &str, dir: PathBuf) -> Result<(), StepError> {
        crate::vmm::marked::kill_unrecorded(self.vmm().name_prefix(), machine, &dir)
            .await
            .map_err(|e| StepError::Retry(Cause::Unrecorded(e)))
    }

    async fn wait_ready(&self, process: &VmmProcess, timeout: Duration) -> Result<(), ReadyError> {
        self.vmm().wait_ready(process, timeout).await.map(|_| ())
    }

    async fn wait_idle(&self, process: &VmmProcess, timeout: Duration) -> Result<(), ReadyError> {
        self.vmm().wait_idle(process, timeout).await
    }

    async fn claim(
        &self,
        process: &VmmProcess,
        claim: &Claim,
        timeout: Duration,
    ) -> Result<(), ReadyError> {
        self.vmm().claim(process, claim, timeout).await.map(|_| ())
    }

    async fn pause(&self, process: &VmmProcess) -> Result<(), ControlError> {
        self.vmm().pause(process).await
    }

    async fn resume(&self, process: &VmmProcess) -> Result<(), ControlError> {
        self.vmm().resume(process).await
    }

    fn vmm_confinement(&self, machine: &str, slot: u32) -> Confinement {
        self.vmm_host().confinement(machine, slot)
    }

    async fn tcp_connect(
        &self,
        addr: std::net::SocketAddr,
        timeout: Duration,
    ) -> Result<(), String> {
        match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(_stream)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {timeout:?}")),
        }
    }

    async fn publish(&self, route: Route) -> Result<(), StepError> {
        ask(
            names::REGISTRY,
            |reply| RegistryMsg::Publish { route, reply },
            TABLE_TIMEOUT,
        )
        .await?
        .map_err(refused)?;
        Ok(())
    }

    async fn unpublish(&self, machine: &str) -> Result<(), StepError> {
        let machine = machine.to_string();
        ask(
            names::REGISTRY,
            |reply| RegistryMsg::Unpublish { machine, reply },
            TABLE_TIMEOUT,
        )
        .await?
        .map_err(refused)?;
        Ok(())
    }
}

/// A call to the network fabric, bounded by [`NETWORK_TIMEOUT`].
async fn network_call(
    plan: &NetPlan,
    call: impl std::future::Future<Output = Result<(), crate::net::NetError>>,
) -> Result<(), StepError> {
    match tokio::time::timeout(NETWORK_TIMEOUT, call).await {
        Ok(done) => done.map_err(|e| StepError::Retry(Cause::Net(e))),
        Err(_) => Err(StepError::Retry(Cause::Timeout {
            what: format!("the network of {}", plan.netns),
            waited: NETWORK_TIMEOUT,
        })),
    }
}

/// Runs cgroup file work off the async threads (a removal may wait for killed
/// processes to leave).
async fn blocking(
    work: impl FnOnce() -> Result<(), CgroupError> + Send + 'static,
) -> Result<(), StepError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|source| {
            StepError::Retry(Cause::Task {
                work: "cgroup",
                source,
            })
        })?
        .map_err(|e| StepError::Retry(Cause::Cgroup(e)))
}
