//! NodeService: the host's capacity and usage, and the leak audit.

use tonic::{Request, Response, Status};

use super::convert;
use super::pb::{self, node_service_server::NodeService};
use super::status::ApiError;
use crate::actors::services::Services;

/// The node API.
pub struct Node {
    services: Services,
}

impl Node {
    /// Over the services.
    pub fn new(services: Services) -> Self {
        Node { services }
    }
}

#[tonic::async_trait]
impl NodeService for Node {
    async fn get_node(&self, _: Request<pb::GetNodeRequest>) -> Result<Response<pb::Node>, Status> {
        let store = self.services.store();
        let usage = store.usage().map_err(ApiError::from)?;
        let leases = store.leases().map_err(ApiError::from)?;
        let (vcpus, memory) = self.services.capacity_totals();
        // The cache's counters, absent while it restarts or is busy: the rest of the
        // answer matters more than they do, and a zero would be a guess.
        let images = crate::actors::ask(
            crate::actors::names::ROOTFS_CACHE,
            |reply| crate::actors::rootfs_cache::RootfsMsg::Stats { reply },
            std::time::Duration::from_secs(2),
        )
        .await
        .ok();
        let pools = crate::actors::ask(
            crate::actors::names::POOLS,
            crate::actors::pools::PoolMsg::Status,
            std::time::Duration::from_secs(2),
        )
        .await
        .unwrap_or_default();
        let listening = self.services.listening();
        let sinks = crate::actors::etcd_sink::status(&self.services);
        Ok(Response::new(pb::Node {
            version: env!("CARGO_PKG_VERSION").to_string(),
            vcpus_total: vcpus,
            vcpus_used: usage.vcpus,
            memory_mib_total: memory,
            memory_mib_used: usage.memory_mib,
            machines: usage.machines,
            ip_slots_total: self.services.lease_slots(),
            ip_slots_used: leases.len() as u32,
            vmm: self.services.vmm().describe(),
            runs_observed: self.services.runs_observed(),
            image_pulls: images.map(|s| s.pulls),
            image_builds: images.map(|s| s.oci_bases_built),
            image_checks: images.map(|s| s.checks),
            pools: pools.iter().map(convert::pool).collect(),
            singleton_restarts: self.services.singleton_restarts(),
            api_address: listening.api.map(|a| a.to_string()).unwrap_or_default(),
            metrics_address: listening.metrics.map(|a| a.to_string()).unwrap_or_default(),
            dns_address: listening.dns.map(|a| a.to_string()).unwrap_or_default(),
            guest_dns_address: listening
                .guest_dns
                .map(|a| a.to_string())
                .unwrap_or_default(),
            sinks: sinks.iter().map(convert::sink).collect(),
        }))
    }

    async fn audit(
        &self,
        _: Request<pb::AuditRequest>,
    ) -> Result<Response<pb::AuditReport>, Status> {
        // Read-only host inspection, not host work: a scan of names and two tables.
        let audit = crate::audit::run(&self.services)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(convert::audit(&audit)))
    }
}
