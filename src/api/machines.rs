//! MachineService: create, read, change the desired state, wait, watch.

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use ractor::ActorRef;
use tokio::sync::broadcast::error::RecvError;
use tonic::{Request, Response, Status};

use super::convert;
use super::pb::{self, machine_service_server::MachineService};
use super::status::ApiError;
use crate::actors::etcd_sink::{pending_for, status};
use crate::actors::machine::{BegunRun, now_ms};
use crate::actors::pools::PoolMsg;
use crate::actors::services::Services;
use crate::actors::supervisor::SupervisorMsg;
use crate::config::PoolConfig;
use crate::image::ImageRef;
use crate::machine::admission;
use crate::machine::claim::{self, Claim};
use crate::machine::decide::{self, apply_desired};
use crate::machine::record::{Desired, MachineRecord, MachineState};
use crate::machine::spec::{self, Limits};
use crate::store::{ClaimRequest, Claimed, Created, RequestBody, StoreError, Update};

/// Longest wait a WaitMachine call may ask for.
const MAX_WAIT: Duration = Duration::from_secs(600);

/// The machine API.
pub struct Machines {
    services: Services,
    supervisor: ActorRef<SupervisorMsg>,
}

impl Machines {
    /// A handler set over the services, waking runs through `supervisor`.
    pub fn new(services: Services, supervisor: ActorRef<SupervisorMsg>) -> Self {
        Machines {
            services,
            supervisor,
        }
    }

    fn wake(&self, id: &str) -> Result<(), ApiError> {
        self.supervisor
            .cast(SupervisorMsg::Wake(id.to_string()))
            .map_err(|e| ApiError::Wake(e.to_string()))
    }

    fn limits(&self) -> Limits {
        let cap = &self.services.config().capacity;
        Limits {
            max_vcpus: cap.max_vcpus_per_machine,
            min_memory_mib: cap.min_memory_mib_per_machine,
            max_memory_mib: cap.max_memory_mib_per_machine,
        }
    }

    fn create(&self, req: pb::CreateMachineRequest) -> Result<MachineRecord, ApiError> {
        spec::check_request_id(&req.request_id)?;
        spec::check_machine_name(&req.name)?;
        let wanted_pool = req
            .spec
            .as_ref()
            .map(|s| s.pool.clone())
            .unwrap_or_default();
        if !wanted_pool.is_empty() {
            spec::check_name(&wanted_pool).map_err(|e| spec::SpecError::Invalid {
                field: "spec.pool",
                reason: e.to_string(),
            })?;
        }
        let spec = spec::check_spec(convert::raw_spec(req.spec), &self.limits())?;
        let start = req.start.unwrap_or(true);
        let body = request_body(&req.name, &spec, &wanted_pool, start);
        // A retry returns the first call's machine, provided it asks for the same thing
        // (another body under the same request id is refused, naming request_id). It also
        // wakes the machine's run: the first call may have crashed between its commit and
        // its wake (a wake of a settled run costs one look at the record).
        if let Some(existing) = self
            .services
            .store()
            .machine_by_request(&req.request_id, body)?
        {
            self.wake(&existing.id)?;
            return Ok(existing);
        }
        // A machine created stopped claims nothing: prepared capacity is booted already.
        let pool = match start {
            true => self.pool_for(&spec, &wanted_pool)?,
            false => None,
        };
        if let Some(pool) = pool {
            let claimed = self.services.store().claim_prepared(ClaimRequest {
                claim: Claim {
                    pool: pool.clone(),
                    request_id: req.request_id.clone(),
                    name: req.name.clone(),
                    spec: spec.clone(),
                    now_ms: now_ms(),
                },
                body,
            })?;
            match claimed {
                Claimed::New(rec, event) => {
                    crate::failpoints::hit("pools.claim.after_commit");
                    self.services.emit(event);
                    self.wake(&rec.id)?;
                    tell_pools(PoolMsg::Claimed(pool));
                    return Ok(rec);
                }
                Claimed::Existing(rec) => {
                    self.wake(&rec.id)?;
                    return Ok(rec);
                }
                Claimed::Empty if !wanted_pool.is_empty() => {
                    tell_pools(PoolMsg::Missed(pool.clone()));
                    return Err(ApiError::Store(StoreError::Refused(format!(
                        "spec.pool: pool {pool} has no prepared machine ready"
                    ))));
                }
                // Nothing ready: a cold create, counted as the pool's miss.
                Claimed::Empty => tell_pools(PoolMsg::Missed(pool)),
            }
        }
        let image = ImageRef::parse(&spec.image).map_err(ApiError::Image)?;
        image
            .check_local_roots(&self.services.config().images.local_roots)
            .map_err(ApiError::Image)?;
        image.check_available().map_err(ApiError::Image)?;
        // A registry image's own entrypoint and command are only known once it is pulled
        // (the vm_config step fails the machine, naming spec.command, if it has none).
        if spec.command.is_empty()
            && spec.entrypoint.is_empty()
            && !image.is_oci()
            && image.defaults().command.is_empty()
        {
            return Err(ApiError::Spec(spec::SpecError::Missing {
                field: "spec.command",
            }));
        }
        self.check_disk_room(&spec)?;
        let id =
            spec::new_machine_id().map_err(|e| ApiError::Wake(format!("no randomness: {e}")))?;
        let mut rec = MachineRecord::new(id, req.name, req.request_id, spec, now_ms());
        rec.disk_layout = self.services.config().images.disk_layout;
        if !start {
            rec.desired = Desired::Stopped;
        }
        // The first run begins in the create's own commit (`decide::begin_new`): the run
        // starts without a commit of its own.
        let mut update = Update::default();
        let begun = decide::begin_new(&mut rec, &self.services.policy(), now_ms()).map(
            |(run, marked, messages)| {
                if decide::takes_lease(&run) {
                    update.lease_slots = Some(self.services.lease_slots());
                }
                (BegunRun { run, marked }, messages)
            },
        );
        let (begun, messages) = begun.unzip();
        let created = self.services.store().create_machine_with(
            rec,
            self.services.room(),
            body,
            update,
            messages.unwrap_or_default(),
        )?;
        match created {
            Created::New(rec, events) => {
                for event in events {
                    self.services.emit(event);
                }
                match begun {
                    Some(begun) => self
                        .supervisor
                        .cast(SupervisorMsg::Begin(rec.id.clone(), begun))
                        .map_err(|e| ApiError::Wake(e.to_string()))?,
                    None => self.wake(&rec.id)?,
                }
                Ok(rec)
            }
            Created::Existing(rec) => {
                self.wake(&rec.id)?;
                Ok(rec)
            }
        }
    }

    /// Refuses a create whose root disk would take the data dir's filesystem below
    /// `capacity.min_free_mib` (a disk of the image's size asks for nothing beyond it:
    /// that size is only known once the image is there).
    fn check_disk_room(&self, spec: &spec::MachineSpec) -> Result<(), ApiError> {
        let config = self.services.config();
        let Some(free) = free_mib(&config.data_dir) else {
            // Not measurable (the directory is not there yet): the disk step finds out.
            return Ok(());
        };
        admission::disk_room(free, u64::from(spec.disk_mib), config.capacity.min_free_mib)
            .map_err(|why| ApiError::Store(StoreError::NoRoom(why)))
    }

    /// The pool a create claims from (see `machine::claim::pool_for`).
    fn pool_for(&self, spec: &spec::MachineSpec, wanted: &str) -> Result<Option<String>, ApiError> {
        let pools: Vec<_> = self
            .services
            .config()
            .pools
            .iter()
            .map(PoolConfig::shape)
            .collect();
        Ok(claim::pool_for(&pools, spec, wanted)?.map(str::to_string))
    }

    fn set_desired(&self, id: &str, desired: Desired) -> Result<MachineRecord, ApiError> {
        spec::check_machine_id(id)?;
        let now = now_ms();
        let (rec, events) = self.services.store().update_machine(id, |rec| {
            if let Some(pool) = rec.pool_owner()
                && rec.desired == Desired::Prepared
            {
                return Err(StoreError::Refused(format!(
                    "machine {} is prepared capacity of pool {pool}; create a machine to claim it",
                    rec.id
                )));
            }
            if rec.desired == Desired::Destroyed && desired != Desired::Destroyed {
                return Err(StoreError::Refused(format!(
                    "machine {} is destroyed; it cannot be {}",
                    rec.id,
                    match desired {
                        Desired::Started => "started",
                        Desired::Stopped => "stopped",
                        Desired::Destroyed => "destroyed",
                        Desired::Prepared => "prepared",
                    }
                )));
            }
            if rec.desired == desired && (desired != Desired::Started || rec.failure.is_none()) {
                return Ok(None);
            }
            apply_desired(rec, desired);
            rec.updated_at_ms = now;
            Ok(Some(format!("desired state: {desired:?}").to_lowercase()))
        })?;
        for event in events {
            self.services.emit(event);
        }
        self.wake(id)?;
        Ok(rec)
    }

    fn get(&self, id: &str) -> Result<MachineRecord, ApiError> {
        spec::check_machine_id(id)?;
        self.services
            .store()
            .machine(id)?
            .ok_or_else(|| ApiError::Store(StoreError::NotFound(id.to_string())))
    }
}

/// The digest of what a create asks for: its name, its normalised spec and the pool it
/// names. A retry under the same request id must have the same one.
fn request_body(name: &str, spec: &spec::MachineSpec, pool: &str, start: bool) -> RequestBody {
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    // postcard of plain strings and a derived struct cannot fail; an empty encoding would
    // only make every body alike, which the name below still separates.
    let encoded = postcard::to_stdvec(&(name, spec, pool)).unwrap_or_default();
    hash.update(&encoded);
    hash.update(name.as_bytes());
    // Only a stopped create adds to it, so bodies recorded before `start` existed match.
    if !start {
        hash.update(b"\0start=false");
    }
    RequestBody(hash.finalize().into())
}

/// MiB available to an unprivileged writer on the filesystem holding `path`.
fn free_mib(path: &std::path::Path) -> Option<u64> {
    let bytes = crate::image::space::FreeSpace::Statvfs
        .available(path)
        .ok()?;
    Some(bytes >> 20)
}

/// Tells the pool manager about a claim or a miss; it may be restarting, and its
/// counters are not worth failing a create for.
fn tell_pools(msg: PoolMsg) {
    if let Some(cell) = ractor::registry::where_is(crate::actors::names::POOLS) {
        let pools: ActorRef<PoolMsg> = cell.into();
        let _ = pools.cast(msg);
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::MachineEvent, Status>> + Send>>;

#[tonic::async_trait]
impl MachineService for Machines {
    async fn create_machine(
        &self,
        req: Request<pb::CreateMachineRequest>,
    ) -> Result<Response<pb::Machine>, Status> {
        let rec = self.create(req.into_inner())?;
        Ok(Response::new(convert::machine(&rec)))
    }

    async fn get_machine(
        &self,
        req: Request<pb::MachineRef>,
    ) -> Result<Response<pb::Machine>, Status> {
        let mut machine = convert::machine(&self.get(&req.into_inner().id)?);
        machine.pending_sinks = pending_for(status(&self.services).as_ref(), &machine.id);
        Ok(Response::new(machine))
    }

    async fn list_machines(
        &self,
        req: Request<pb::ListMachinesRequest>,
    ) -> Result<Response<pb::ListMachinesResponse>, Status> {
        let req = req.into_inner();
        let (all, prepared) = (req.include_destroyed, req.include_prepared);
        let sinks = status(&self.services);
        let machines = self
            .services
            .store()
            .machines()
            .map_err(ApiError::from)?
            .iter()
            .filter(|m| all || m.state != MachineState::Destroyed)
            .filter(|m| prepared || m.pool_owner().is_none())
            .map(|record| {
                let mut machine = convert::machine(record);
                machine.pending_sinks = pending_for(sinks.as_ref(), &machine.id);
                machine
            })
            .collect();
        Ok(Response::new(pb::ListMachinesResponse { machines }))
    }

    async fn start_machine(
        &self,
        req: Request<pb::MachineRef>,
    ) -> Result<Response<pb::Machine>, Status> {
        let rec = self.set_desired(&req.into_inner().id, Desired::Started)?;
        Ok(Response::new(convert::machine(&rec)))
    }

    async fn stop_machine(
        &self,
        req: Request<pb::MachineRef>,
    ) -> Result<Response<pb::Machine>, Status> {
        let rec = self.set_desired(&req.into_inner().id, Desired::Stopped)?;
        Ok(Response::new(convert::machine(&rec)))
    }

    async fn destroy_machine(
        &self,
        req: Request<pb::MachineRef>,
    ) -> Result<Response<pb::Machine>, Status> {
        let rec = self.set_desired(&req.into_inner().id, Desired::Destroyed)?;
        Ok(Response::new(convert::machine(&rec)))
    }

    async fn wait_machine(
        &self,
        req: Request<pb::WaitMachineRequest>,
    ) -> Result<Response<pb::WaitMachineResponse>, Status> {
        let req = req.into_inner();
        let target = convert::state_from(req.state)
            .ok_or(ApiError::Spec(spec::SpecError::Missing { field: "state" }))?;
        let timeout = Duration::from_millis(u64::from(req.timeout_ms)).min(MAX_WAIT);
        // Subscribe before reading, so no change between the read and the wait is missed.
        let mut events = self.services.subscribe_events();
        // A stopping daemon answers at once rather than hold its shutdown for the wait.
        let mut stopping = self.services.stopping();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let rec = self.get(&req.id)?;
            // A failed machine is settled only once its run released everything.
            let settled = rec.state != MachineState::Failed || rec.nothing_touched();
            // A machine in a state it cannot leave by itself will not reach the target.
            let stuck = settled
                && (rec.state == MachineState::Destroyed
                    || (rec.state == MachineState::Failed && rec.desired != Desired::Destroyed)
                    || (rec.state == MachineState::Stopped && rec.desired == Desired::Stopped));
            if (rec.state == target && settled) || stuck {
                return Ok(Response::new(pb::WaitMachineResponse {
                    reached: rec.state == target,
                    machine: Some(convert::machine(&rec)),
                }));
            }
            loop {
                let next = tokio::select! {
                    next = tokio::time::timeout_at(deadline, events.recv()) => next,
                    _ = stopping.wait_for(|stopping| *stopping) => {
                        return Err(ApiError::ShuttingDown.into());
                    }
                };
                match next {
                    Err(_) => {
                        let rec = self.get(&req.id)?;
                        return Ok(Response::new(pb::WaitMachineResponse {
                            reached: rec.state == target,
                            machine: Some(convert::machine(&rec)),
                        }));
                    }
                    Ok(Ok(event)) if event.machine_id != req.id => continue,
                    Ok(Ok(_)) | Ok(Err(RecvError::Lagged(_))) => break,
                    Ok(Err(RecvError::Closed)) => {
                        return Err(ApiError::ShuttingDown.into());
                    }
                }
            }
        }
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        req: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let req = req.into_inner();
        let filter = (!req.machine_id.is_empty()).then_some(req.machine_id);
        if let Some(id) = &filter {
            spec::check_machine_id(id).map_err(ApiError::from)?;
        }
        let mut live = self.services.subscribe_events();
        let services = self.services.clone();
        let stream = async_stream(self.services.stopping(), move |tx| async move {
            let mut last = req.after_seq;
            if !replay(&services, filter.as_deref(), &mut last, &tx).await || req.history_only {
                return;
            }
            loop {
                let event = match live.recv().await {
                    Ok(event) => event,
                    Err(RecvError::Lagged(_)) => {
                        // Fell behind: catch up from the log, then go on live.
                        if !replay(&services, filter.as_deref(), &mut last, &tx).await {
                            return;
                        }
                        continue;
                    }
                    Err(RecvError::Closed) => return,
                };
                if event.seq <= last || filter.as_ref().is_some_and(|id| *id != event.machine_id) {
                    continue;
                }
                last = event.seq;
                if tx.send(Ok(convert::event(&event))).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }
}

/// Events a stream replays per read of the log: history is sent page by page, never
/// loaded whole.
const REPLAY_PAGE: usize = 256;

/// Sends the recorded events after `*last` (of one machine or all), page by page, and
/// moves `*last` on. False when the stream is over (the client left, or the log could
/// not be read: the client then gets the error).
async fn replay(
    services: &Services,
    filter: Option<&str>,
    last: &mut u64,
    tx: &tokio::sync::mpsc::Sender<Result<pb::MachineEvent, Status>>,
) -> bool {
    loop {
        let page = match services.store().events_page(filter, *last, REPLAY_PAGE) {
            Ok(page) => page,
            Err(e) => {
                let _ = tx.send(Err(ApiError::from(e).into())).await;
                return false;
            }
        };
        let full = page.len() == REPLAY_PAGE;
        for event in page {
            *last = event.seq;
            if tx.send(Ok(convert::event(&event))).await.is_err() {
                return false;
            }
        }
        if !full {
            return true;
        }
    }
}

/// A stream fed by a task through a bounded channel. The task ends when the client goes,
/// at once, even while it waits for something else (a quiet machine's next event may
/// never come: a task that learnt of the client's leaving only by sending would be kept
/// forever, and a caller opening and dropping streams would pile them up). When the
/// daemon stops (`stop` turns true), the caller is told so with UNAVAILABLE and the
/// stream ends, so the server can close without waiting for every watcher to leave.
pub fn async_stream<U, F, Fut>(
    mut stop: tokio::sync::watch::Receiver<bool>,
    producer: F,
) -> Pin<Box<dyn Stream<Item = Result<U, Status>> + Send>>
where
    U: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<Result<U, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let watch = tx.clone();
    let produce = producer(tx);
    tokio::spawn(async move {
        tokio::select! {
            () = produce => {}
            () = watch.closed() => {}
            () = async {
                // (Or the sender is gone: the daemon is going too.)
                let _ = stop.wait_for(|stopping| *stopping).await;
            } => {
                let goodbye = Status::from(ApiError::ShuttingDown);
                let _ = tokio::time::timeout(GOODBYE_WAIT, watch.send(Err(goodbye))).await;
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// How long a stopping daemon tries to tell a slow reader why its stream ends.
const GOODBYE_WAIT: Duration = Duration::from_millis(500);

#[cfg(test)]
mod stream_tests {
    use super::*;

    /// Tells when it is dropped, with the producer holding it.
    struct Dropped(Option<tokio::sync::oneshot::Sender<()>>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            if let Some(tx) = self.0.take() {
                let _ = tx.send(());
            }
        }
    }

    #[tokio::test]
    async fn a_producer_waiting_on_nothing_ends_when_the_client_goes() {
        let (told, dropped) = tokio::sync::oneshot::channel();
        let guard = Dropped(Some(told));
        let (_stop, stopping) = tokio::sync::watch::channel(false);
        let stream = async_stream(
            stopping,
            move |_tx: tokio::sync::mpsc::Sender<Result<u32, Status>>| async move {
                let _guard = guard;
                // Waits for an event that never comes, never sending.
                std::future::pending::<()>().await;
            },
        );
        drop(stream);
        tokio::time::timeout(std::time::Duration::from_secs(10), dropped)
            .await
            .expect("the producer ended")
            .expect("dropped, not leaked");
    }

    #[tokio::test]
    async fn a_finished_producer_ends_the_stream() {
        use tokio_stream::StreamExt;
        let (_stop, stopping) = tokio::sync::watch::channel(false);
        let stream = async_stream(stopping, |tx| async move {
            let _ = tx.send(Ok(7u32)).await;
        });
        let items: Vec<u32> = stream.map(|i| i.expect("an item")).collect().await;
        assert_eq!(items, vec![7]);
    }

    #[tokio::test]
    async fn a_stopping_daemon_ends_a_waiting_stream_with_unavailable() {
        use tokio_stream::StreamExt;
        let (stop, stopping) = tokio::sync::watch::channel(false);
        let mut stream = async_stream(stopping, |tx| async move {
            let _ = tx.send(Ok(1u32)).await;
            std::future::pending::<()>().await;
        });
        assert_eq!(stream.next().await.map(|i| i.expect("ok")), Some(1));
        stop.send_replace(true);
        let last = stream
            .next()
            .await
            .expect("a goodbye")
            .expect_err("an error");
        assert_eq!(last.code(), tonic::Code::Unavailable);
        assert!(stream.next().await.is_none(), "the stream ends");
    }
}
