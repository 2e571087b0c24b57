//! The only module that touches redb. Every durable fact of the daemon lives here, and
//! every change that must be atomic is one method, hence one commit.
//!
//! ```text
//! hearth.redb
//! ├── meta      &str -> u64            "schema" = SCHEMA_VERSION, "event_seq", "outbox_seq"
//! ├── machines  &str id -> bytes       Stored::<MachineRecord>   (owner: that MachineActor)
//! ├── requests  &str request_id -> id  idempotency of CreateMachine (kept after destroy,
//! │                                    until the tombstone is compacted)
//! ├── request_bodies &str request_id -> [u8; 32]  digest of the create that used it
//! ├── names     &str name -> id        machines not destroyed (unique names)
//! ├── live      &str id -> (vcpus, MiB) machines not destroyed: what admission counts
//! ├── events    (&str id, u64 seq) -> bytes  Stored::<MachineEvent>; per machine the
//! │                                    first and the last few are kept (see `history`)
//! ├── event_order u64 seq -> &str id   the events in global order, for paged reads
//! ├── leases    u32 slot -> &str id    the IP pool's /29 blocks     (owner: the lease step)
//! ├── routes    &str id -> bytes       Stored::<Route>, the embedded registry (owner: RegistryPublisher)
//! ├── outbox    u64 seq -> bytes       Stored::<RouteChange> not yet delivered to every sink
//! └── images    &str base digest -> bytes  Stored::<ImageEntry>      (owner: RootfsCache)
//! ```
//!
//! Values are postcard inside a versioned enum ([`Stored`]): postcard is not
//! self-describing, so a changed type gets a new variant and old records keep decoding.

pub(crate) mod codec;
mod history;
mod images;
pub mod settings;

use std::collections::BTreeMap;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

pub use codec::CodecError;
use codec::{decode, encode};

use crate::machine::admission;
use crate::machine::claim::{self, Claim};
use crate::machine::record::{MachineEvent, MachineRecord, MachineState};
use crate::route::{Route, RouteChange};

pub use history::HistoryBounds;
use history::append_event;

/// Bumped when the layout above changes incompatibly.
pub const SCHEMA_VERSION: u64 = 1;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const MACHINES: TableDefinition<&str, &[u8]> = TableDefinition::new("machines");
const REQUESTS: TableDefinition<&str, &str> = TableDefinition::new("requests");
const REQUEST_BODIES: TableDefinition<&str, &[u8]> = TableDefinition::new("request_bodies");
const NAMES: TableDefinition<&str, &str> = TableDefinition::new("names");
const LIVE: TableDefinition<&str, (u32, u64)> = TableDefinition::new("live");
const EVENTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("events");
const EVENT_ORDER: TableDefinition<u64, &str> = TableDefinition::new("event_order");
const LEASES: TableDefinition<u32, &str> = TableDefinition::new("leases");
const ROUTES: TableDefinition<&str, &[u8]> = TableDefinition::new("routes");
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
const IMAGES: TableDefinition<&str, &[u8]> = TableDefinition::new("images");

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// redb failed (I/O, corruption, or the file is open in another process).
    #[error("store: {0}")]
    Db(#[from] redb::Error),
    /// A stored value could not be decoded or encoded.
    #[error("store: {0}")]
    Codec(#[from] CodecError),
    /// The file was written by an incompatible version.
    #[error("store: schema version {found} is not supported (this build reads {SCHEMA_VERSION})")]
    Schema {
        /// The version in the file.
        found: u64,
    },
    /// No machine has this id.
    #[error("machine {0} not found")]
    NotFound(String),
    /// Another machine has the name.
    #[error("name: {name:?} is already used by machine {id}")]
    NameTaken {
        /// The name.
        name: String,
        /// The machine that has it.
        id: String,
    },
    /// The host has no room for the machine.
    #[error("no room on this host: {0}")]
    NoRoom(String),
    /// The change is not allowed in the machine's current state.
    #[error("{0}")]
    Refused(String),
    /// The record is no longer the one the change was computed from (a compare-and-swap
    /// that lost); nothing was written. The caller reads again and recomputes.
    #[error("the record changed meanwhile")]
    Changed,
    /// The file could not be opened again after a failed write.
    #[error("store: could not be opened again after a failed write: {0}")]
    Reopen(String),
    /// A request id already used by a create that asked for something else.
    #[error(
        "request_id: {request_id:?} was used by an earlier create with a different name or \
         spec (machine {id}); use a new request id for a new machine"
    )]
    RequestReused {
        /// The request id.
        request_id: String,
        /// The machine the first create made.
        id: String,
    },
}

impl StoreError {
    /// True when the store failed because its file system is full.
    pub fn is_no_space(&self) -> bool {
        let StoreError::Db(e) = self else {
            return false;
        };
        let io = match e {
            redb::Error::Io(io) => Some(io),
            _ => None,
        };
        io.is_some_and(|io| io.raw_os_error() == Some(libc::ENOSPC))
            || e.to_string().contains("No space left on device")
    }
}

macro_rules! db_error_from {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.into())
            }
        }
    )*};
}
db_error_from!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// The result of a create.
#[derive(Debug)]
pub enum Created {
    /// A new machine was recorded, with its events ("created", and the state its first
    /// run begins in).
    New(MachineRecord, Vec<MachineEvent>),
    /// The request id was seen before: the machine it created.
    Existing(MachineRecord),
}

/// The result of a claim from a pool.
#[derive(Debug)]
pub enum Claimed {
    /// A prepared machine became the caller's.
    New(MachineRecord, MachineEvent),
    /// The request id was seen before: the machine it created or claimed.
    Existing(MachineRecord),
    /// The pool has no prepared machine ready.
    Empty,
}

/// What a claim makes of a prepared machine: the claim (see `machine::claim`) and what
/// the caller asked for (see [`RequestBody`]).
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    /// The pool, the caller's request id, name and spec, and when.
    pub claim: Claim,
    /// What the caller asked for.
    pub body: RequestBody,
}

/// Node-wide room and usage, for admission (see `machine::admission`).
pub use crate::machine::admission::{Room, Usage};

/// The digest of what a create asked for (its name and its normalised spec), kept with
/// its request id: a retry with the same id must ask for the same thing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestBody(pub [u8; 32]);

/// The daemon's database.
///
/// redb latches a failed write (a full file system, say): every later transaction fails
/// with `PreviousIo` until the file is opened again. The store therefore reopens the file
/// when a transaction cannot begin for that reason, so the daemon works again as soon as
/// the cause is gone. What was committed stays committed; the failed commit is as if it
/// never happened.
pub struct Store {
    /// The open database and its generation (bumped by each reopen); `None` while a
    /// reopen failed (the next transaction tries again).
    db: std::sync::RwLock<(Option<Database>, u64)>,
    path: std::path::PathBuf,
    history: HistoryBounds,
}

/// Bumped when a derived table (see `history`) changes how it is built: a file whose
/// indexes were built by another version has them rebuilt at open.
const INDEX_VERSION: u64 = 1;

/// How long a reopen waits for the old handle's lock to be released (a transaction still
/// running on it when the reopen began holds it).
const REOPEN_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);

impl Store {
    /// Opens (or creates) the file, creates missing tables and checks the schema version.
    /// A second open of the same file fails: that is the daemon's single-instance lock.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Store::open_waiting(path, std::time::Duration::ZERO)
    }

    /// [`Store::open`], waiting up to `patience` while the file's lock is held.
    ///
    /// Why wait: a daemon killed a moment ago can leave its lock held briefly by a child
    /// it forked that has not exec'd yet (the descriptor is closed at exec, not at the
    /// fork); a restart right after the crash must not fail on that. A second daemon
    /// really running on the same file still keeps this one out, after `patience`.
    pub fn open_waiting(path: &Path, patience: std::time::Duration) -> Result<Store, StoreError> {
        let db = open_db(path, patience)?;
        Ok(Store {
            db: std::sync::RwLock::new((Some(db), 0)),
            path: path.to_path_buf(),
            history: HistoryBounds::default(),
        })
    }

    /// Begins a transaction with `begin`; when the database refuses because an earlier
    /// write failed, reopens the file once and tries again.
    fn begin<T>(
        &self,
        begin: impl Fn(&Database) -> Result<T, redb::TransactionError>,
    ) -> Result<T, StoreError> {
        let generation = {
            let guard = self
                .db
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(db) = &guard.0 {
                match begin(db) {
                    Err(redb::TransactionError::Storage(redb::StorageError::PreviousIo)) => {}
                    other => return other.map_err(StoreError::from),
                }
            }
            guard.1
        };
        self.reopen(generation)?;
        let guard = self
            .db
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &guard.0 {
            Some(db) => begin(db).map_err(StoreError::from),
            None => Err(StoreError::Reopen("the store is not open".to_string())),
        }
    }

    /// Opens the file again unless another caller already did since `generation`.
    fn reopen(&self, generation: u64) -> Result<(), StoreError> {
        let mut guard = self
            .db
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if guard.1 != generation && guard.0.is_some() {
            return Ok(());
        }
        tracing::warn!(path = %self.path.display(), "a store write failed earlier; opening the store again");
        // The old handle goes first: it holds the file's lock.
        guard.0 = None;
        guard.1 = generation.wrapping_add(1);
        match open_db(&self.path, REOPEN_PATIENCE) {
            Ok(db) => {
                guard.0 = Some(db);
                Ok(())
            }
            Err(e) => Err(StoreError::Reopen(e.to_string())),
        }
    }

    fn write(&self) -> Result<redb::WriteTransaction, StoreError> {
        self.begin(Database::begin_write)
    }

    fn read(&self) -> Result<redb::ReadTransaction, StoreError> {
        self.begin(|db| db.begin_read())
    }

    /// The store with other bounds on each machine's event history.
    pub fn with_history(mut self, history: HistoryBounds) -> Store {
        self.history = history;
        self
    }

    /// The machine a request id made, or `RequestReused` when that create asked for
    /// something else. A request id recorded without a digest (by an older daemon)
    /// matches any body.
    fn earlier_request<R, B, M>(
        requests: &R,
        bodies: &B,
        machines: &M,
        request_id: &str,
        body: RequestBody,
    ) -> Result<Option<MachineRecord>, StoreError>
    where
        R: ReadableTable<&'static str, &'static str>,
        B: ReadableTable<&'static str, &'static [u8]>,
        M: ReadableTable<&'static str, &'static [u8]>,
    {
        let Some(id) = requests.get(request_id)?.map(|v| v.value().to_string()) else {
            return Ok(None);
        };
        let same = bodies
            .get(request_id)?
            .is_none_or(|stored| stored.value() == body.0.as_slice());
        if !same {
            return Err(StoreError::RequestReused {
                request_id: request_id.to_string(),
                id,
            });
        }
        let found = machines
            .get(id.as_str())?
            .map(|v| decode::<MachineRecord>(v.value()))
            .transpose()?
            .ok_or(StoreError::NotFound(id))?;
        Ok(Some(found))
    }

    /// Records a new machine with its first event, in one commit: the request id, the
    /// name and the admission check are decided atomically with the insert.
    pub fn create_machine(
        &self,
        rec: MachineRecord,
        room: Room,
        body: RequestBody,
    ) -> Result<Created, StoreError> {
        self.create_machine_with(rec, room, body, Update::default(), Vec::new())
    }

    /// [`create_machine`](Self::create_machine) of a record whose first run is begun on it
    /// already (`decide::begin_new`): `update` takes the run's lease in the same commit
    /// (it is never lazy), and `messages` are the events of that begin.
    pub fn create_machine_with(
        &self,
        rec: MachineRecord,
        room: Room,
        body: RequestBody,
        update: Update,
        messages: Vec<String>,
    ) -> Result<Created, StoreError> {
        let txn = self.write()?;
        let outcome = {
            let mut requests = txn.open_table(REQUESTS)?;
            let mut bodies = txn.open_table(REQUEST_BODIES)?;
            let mut names = txn.open_table(NAMES)?;
            let mut machines = txn.open_table(MACHINES)?;
            let mut live = txn.open_table(LIVE)?;
            if let Some(found) =
                Self::earlier_request(&requests, &bodies, &machines, &rec.request_id, body)?
            {
                return Ok(Created::Existing(found));
            }
            if let Some(id) = names.get(rec.name.as_str())? {
                return Err(StoreError::NameTaken {
                    name: rec.name.clone(),
                    id: id.value().to_string(),
                });
            }
            admit(&live, &rec, room)?;
            if let Some(slots) = update.lease_slots {
                let mut leases = txn.open_table(LEASES)?;
                match lease_in(&mut leases, &rec.id, slots) {
                    // No room: the lease step's own effect fails, naming it.
                    Ok(_) | Err(StoreError::NoRoom(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            requests.insert(rec.request_id.as_str(), rec.id.as_str())?;
            bodies.insert(rec.request_id.as_str(), body.0.as_slice())?;
            names.insert(rec.name.as_str(), rec.id.as_str())?;
            machines.insert(rec.id.as_str(), encode(&rec)?.as_slice())?;
            live.insert(rec.id.as_str(), live_value(&rec))?;
            let mut events = Vec::new();
            for message in std::iter::once("created".to_string()).chain(messages) {
                events.push(append_event(&txn, &rec, message, self.history)?);
            }
            Created::New(rec, events)
        };
        commit(txn)?;
        Ok(outcome)
    }

    /// Records a new prepared machine for a pool (no request id, no name: nobody has
    /// asked for it yet), with its first event, in one commit, subject to admission like
    /// any machine: prepared capacity counts against the node.
    pub fn create_prepared(
        &self,
        rec: MachineRecord,
        room: Room,
    ) -> Result<(MachineRecord, MachineEvent), StoreError> {
        let txn = self.write()?;
        let event = {
            let mut machines = txn.open_table(MACHINES)?;
            let mut live = txn.open_table(LIVE)?;
            admit(&live, &rec, room)?;
            machines.insert(rec.id.as_str(), encode(&rec)?.as_slice())?;
            live.insert(rec.id.as_str(), live_value(&rec))?;
            let pool = rec.pool_owner().unwrap_or_default();
            append_event(
                &txn,
                &rec,
                format!("prepared for pool {pool}"),
                self.history,
            )?
        };
        commit(txn)?;
        Ok((rec, event))
    }

    /// Hands one prepared machine of `claim.pool` to a caller, in one commit: the record
    /// takes the caller's request id, name and spec, is wanted started, and is marked
    /// claimed (never to return to the pool); its `ready` step is to be done again, now
    /// with the workload. The oldest ready machine is taken. A request id seen before
    /// answers with its machine, as a create does.
    pub fn claim_prepared(&self, request: ClaimRequest) -> Result<Claimed, StoreError> {
        let ClaimRequest { claim, body } = request;
        let txn = self.write()?;
        let outcome = {
            let mut requests = txn.open_table(REQUESTS)?;
            let mut bodies = txn.open_table(REQUEST_BODIES)?;
            let mut names = txn.open_table(NAMES)?;
            let mut machines = txn.open_table(MACHINES)?;
            let mut live = txn.open_table(LIVE)?;
            if let Some(found) =
                Self::earlier_request(&requests, &bodies, &machines, &claim.request_id, body)?
            {
                return Ok(Claimed::Existing(found));
            }
            if let Some(id) = names.get(claim.name.as_str())? {
                return Err(StoreError::NameTaken {
                    name: claim.name.clone(),
                    id: id.value().to_string(),
                });
            }
            let mut oldest: Option<MachineRecord> = None;
            // Only machines not destroyed are candidates: tombstones are not read.
            for entry in live.iter()? {
                let (id, _) = entry?;
                let Some(value) = machines.get(id.value())? else {
                    continue;
                };
                let rec: MachineRecord = decode(value.value())?;
                if claim::claimable(&rec, &claim.pool)
                    && oldest.as_ref().is_none_or(|o| claim::claims_first(&rec, o))
                {
                    oldest = Some(rec);
                }
            }
            let Some(mut rec) = oldest else {
                return Ok(Claimed::Empty);
            };
            claim::apply_claim(&mut rec, &claim);
            requests.insert(rec.request_id.as_str(), rec.id.as_str())?;
            bodies.insert(rec.request_id.as_str(), body.0.as_slice())?;
            names.insert(rec.name.as_str(), rec.id.as_str())?;
            machines.insert(rec.id.as_str(), encode(&rec)?.as_slice())?;
            live.insert(rec.id.as_str(), live_value(&rec))?;
            let event = append_event(
                &txn,
                &rec,
                format!(
                    "claimed from pool {} by request {}",
                    claim.pool, rec.request_id
                ),
                self.history,
            )?;
            Claimed::New(rec, event)
        };
        commit(txn)?;
        Ok(outcome)
    }

    /// One machine.
    pub fn machine(&self, id: &str) -> Result<Option<MachineRecord>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(MACHINES)?;
        let found = table.get(id)?.map(|v| decode(v.value())).transpose()?;
        Ok(found)
    }

    /// The machine a create with this request id made, if any; `RequestReused` when
    /// that create asked for something other than `body`.
    pub fn machine_by_request(
        &self,
        request_id: &str,
        body: RequestBody,
    ) -> Result<Option<MachineRecord>, StoreError> {
        let txn = self.read()?;
        let requests = txn.open_table(REQUESTS)?;
        let bodies = txn.open_table(REQUEST_BODIES)?;
        let machines = txn.open_table(MACHINES)?;
        Self::earlier_request(&requests, &bodies, &machines, request_id, body)
    }

    /// Every machine, by id.
    pub fn machines(&self) -> Result<Vec<MachineRecord>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(MACHINES)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (_, value) = entry?;
            out.push(decode(value.value())?);
        }
        Ok(out)
    }

    /// Read-modify-write of one machine in one commit. `change` returns the messages of
    /// the events to append (none, one or several) or refuses the change. When the machine
    /// becomes `destroyed` its name is freed in the same commit.
    pub fn update_machine<F, M>(
        &self,
        id: &str,
        change: F,
    ) -> Result<(MachineRecord, Vec<MachineEvent>), StoreError>
    where
        F: FnOnce(&mut MachineRecord) -> Result<M, StoreError>,
        M: IntoIterator<Item = String>,
    {
        self.update_machine_with(id, Update::default(), change)
    }

    /// [`update_machine`](Self::update_machine), with the commit's options: whether it
    /// may be lazy, and a lease to hold in the same commit.
    pub fn update_machine_with<F, M>(
        &self,
        id: &str,
        update: Update,
        change: F,
    ) -> Result<(MachineRecord, Vec<MachineEvent>), StoreError>
    where
        F: FnOnce(&mut MachineRecord) -> Result<M, StoreError>,
        M: IntoIterator<Item = String>,
    {
        let mut txn = self.write()?;
        if update.lazy {
            txn.set_durability(redb::Durability::None)?;
        }
        if update.free_lease {
            let mut leases = txn.open_table(LEASES)?;
            leases.retain(|_, owner| owner != id)?;
        }
        if let Some(slots) = update.lease_slots {
            let mut leases = txn.open_table(LEASES)?;
            match lease_in(&mut leases, id, slots) {
                // No room: the lease step's own effect fails, naming it.
                Ok(_) | Err(StoreError::NoRoom(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let outcome = {
            let mut machines = txn.open_table(MACHINES)?;
            let mut rec: MachineRecord = machines
                .get(id)?
                .map(|v| decode(v.value()))
                .transpose()?
                .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
            let messages = change(&mut rec)?;
            machines.insert(id, encode(&rec)?.as_slice())?;
            let mut live = txn.open_table(LIVE)?;
            if rec.state == MachineState::Destroyed {
                live.remove(id)?;
            } else {
                live.insert(id, live_value(&rec))?;
            }
            if rec.state == MachineState::Destroyed {
                let mut names = txn.open_table(NAMES)?;
                let owned_by_us = names
                    .get(rec.name.as_str())?
                    .is_some_and(|v| v.value() == id);
                if owned_by_us {
                    names.remove(rec.name.as_str())?;
                }
            }
            let mut events = Vec::new();
            for message in messages {
                events.push(append_event(&txn, &rec, message, self.history)?);
            }
            (rec, events)
        };
        commit_with(txn, !update.lazy)?;
        Ok(outcome)
    }

    /// Usage by machines not destroyed.
    pub fn usage(&self) -> Result<Usage, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(LIVE)?;
        usage_of(&table)
    }

    /// The lease of `machine`, allocating the lowest free slot below `slots` when it has
    /// none. Idempotent: a machine always gets back the slot it holds, from a read (no
    /// commit) when it holds one already (a run's begin may have taken it: see
    /// [`Update::lease_slots`]).
    pub fn lease(&self, machine: &str, slots: u32) -> Result<u32, StoreError> {
        if let Some(slot) = self.lease_of(machine)? {
            return Ok(slot);
        }
        let txn = self.write()?;
        let slot = {
            let mut leases = txn.open_table(LEASES)?;
            lease_in(&mut leases, machine, slots)?
        };
        commit(txn)?;
        Ok(slot)
    }

    /// The slot `machine` holds, if any.
    fn lease_of(&self, machine: &str) -> Result<Option<u32>, StoreError> {
        let txn = self.read()?;
        let leases = txn.open_table(LEASES)?;
        for entry in leases.iter()? {
            let (slot, owner) = entry?;
            if owner.value() == machine {
                return Ok(Some(slot.value()));
            }
        }
        Ok(None)
    }

    /// Releases every lease `machine` holds. Idempotent.
    pub fn release_lease(&self, machine: &str) -> Result<(), StoreError> {
        let txn = self.write()?;
        {
            let mut leases = txn.open_table(LEASES)?;
            leases.retain(|_, owner| owner != machine)?;
        }
        commit(txn)?;
        Ok(())
    }

    /// Every lease: slot -> machine.
    pub fn leases(&self) -> Result<BTreeMap<u32, String>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(LEASES)?;
        let mut out = BTreeMap::new();
        for entry in table.iter()? {
            let (slot, owner) = entry?;
            out.insert(slot.value(), owner.value().to_string());
        }
        Ok(out)
    }

    /// Puts the route in the embedded registry and queues the change for the sinks, in one
    /// commit. Idempotent: an identical route already published changes nothing.
    pub fn publish_route(&self, route: &Route) -> Result<Option<(u64, RouteChange)>, StoreError> {
        let txn = self.write()?;
        let queued = {
            let mut routes = txn.open_table(ROUTES)?;
            let current: Option<Route> = routes
                .get(route.machine_id.as_str())?
                .map(|v| decode(v.value()))
                .transpose()?;
            if current.as_ref() == Some(route) {
                None
            } else {
                routes.insert(route.machine_id.as_str(), encode(route)?.as_slice())?;
                Some(enqueue(&txn, RouteChange::Published(route.clone()))?)
            }
        };
        commit(txn)?;
        Ok(queued)
    }

    /// Removes the machine's route and queues the change, in one commit. Idempotent.
    pub fn unpublish_route(&self, machine: &str) -> Result<Option<(u64, RouteChange)>, StoreError> {
        let txn = self.write()?;
        let queued = {
            let mut routes = txn.open_table(ROUTES)?;
            let removed: Option<Route> = routes
                .remove(machine)?
                .map(|v| decode(v.value()))
                .transpose()?;
            match removed {
                Some(route) => Some(enqueue(&txn, RouteChange::Unpublished(route))?),
                None => None,
            }
        };
        commit(txn)?;
        Ok(queued)
    }

    /// The embedded registry's routes.
    pub fn routes(&self) -> Result<Vec<Route>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(ROUTES)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (_, value) = entry?;
            out.push(decode(value.value())?);
        }
        Ok(out)
    }

    /// Changes not yet delivered to every sink, oldest first.
    pub fn outbox(&self) -> Result<Vec<(u64, RouteChange)>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(OUTBOX)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (seq, value) = entry?;
            out.push((seq.value(), decode(value.value())?));
        }
        Ok(out)
    }

    /// How many changes wait in the outbox.
    pub fn outbox_len(&self) -> Result<u64, StoreError> {
        let txn = self.read()?;
        Ok(txn.open_table(OUTBOX)?.len()?)
    }

    /// Drops delivered changes up to and including `seq`. Idempotent.
    ///
    /// The commit is not flushed to disk by itself (redb's `Durability::None`): the next
    /// durable commit, soon after, carries it. A crash before then loses only the ack, and
    /// the changes are delivered again after the restart, which every sink accepts (a
    /// change is a state, not a delta). So a publish costs one fsync, not two.
    pub fn ack_outbox(&self, seq: u64) -> Result<(), StoreError> {
        let mut txn = self.write()?;
        txn.set_durability(redb::Durability::None)?;
        {
            let mut table = txn.open_table(OUTBOX)?;
            table.retain(|key, _| key > seq)?;
        }
        commit_with(txn, false)?;
        Ok(())
    }
}

/// The slot `machine` holds in `leases`, or the lowest free one below `slots`, taken.
fn lease_in(
    leases: &mut redb::Table<'_, u32, &'static str>,
    machine: &str,
    slots: u32,
) -> Result<u32, StoreError> {
    let mut next_free = 0u32;
    for entry in leases.iter()? {
        let (slot, owner) = entry?;
        let slot = slot.value();
        if owner.value() == machine {
            return Ok(slot);
        }
        if slot == next_free {
            next_free += 1;
        }
    }
    if next_free >= slots {
        return Err(StoreError::NoRoom(format!(
            "all {slots} address blocks are leased"
        )));
    }
    leases.insert(next_free, machine)?;
    Ok(next_free)
}

/// The options of one machine update ([`Store::update_machine_with`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Update {
    /// The commit is not flushed to disk by itself (redb's `Durability::None`): the next
    /// durable commit carries it, and a crash before then loses it together with
    /// everything committed after it (commits are one history). For a change whose loss
    /// leaves a record the run converges from, and that nothing outside the store relies
    /// on until the next durable commit.
    pub lazy: bool,
    /// Hold a lease (below this many slots) for the machine in the same commit, when it
    /// holds none and one is free: the begin of a run that includes the `lease` step
    /// takes the block with the marks, and the step's effect then finds it with a read.
    pub lease_slots: Option<u32>,
    /// Free the machine's lease in the same commit (before a lease is taken, when both
    /// are asked): a run that took it ended before the lease step's effect started.
    pub free_lease: bool,
}

/// Commits a durable write transaction (flushed to disk before it returns), timed for
/// the `hearth_store_commit_seconds` histogram. Every commit of the store goes through
/// here or [`commit_with`].
pub(crate) fn commit(txn: redb::WriteTransaction) -> Result<(), StoreError> {
    commit_with(txn, true)
}

/// Commits `txn`; `durable` says whether it was left durable (the default) or set to
/// `Durability::None` (carried by the next durable commit).
pub(crate) fn commit_with(txn: redb::WriteTransaction, durable: bool) -> Result<(), StoreError> {
    let clock = std::time::Instant::now();
    txn.commit()?;
    crate::metrics::store_committed(durable, clock.elapsed());
    Ok(())
}

/// The most memory redb may use to cache the file's pages (its default is 1 GiB, which
/// a long-running daemon's RSS would grow towards). Holds the hot set of thousands of
/// records; colder pages are read from the page cache of the kernel.
const CACHE_BYTES: usize = 8 << 20;

/// Opens (or creates) the file, creates missing tables, checks the schema version and
/// builds the derived tables when the file's are missing or from another version.
fn open_db(path: &Path, patience: std::time::Duration) -> Result<Database, StoreError> {
    let deadline = std::time::Instant::now() + patience;
    let db = loop {
        match redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(path)
        {
            Ok(db) => break db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen)
                if std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => return Err(e.into()),
        }
    };
    let txn = db.begin_write()?;
    {
        let mut meta = txn.open_table(META)?;
        let found = meta.get("schema")?.map(|v| v.value());
        match found {
            None => {
                meta.insert("schema", SCHEMA_VERSION)?;
            }
            Some(SCHEMA_VERSION) => {}
            Some(found) => return Err(StoreError::Schema { found }),
        }
        txn.open_table(MACHINES)?;
        txn.open_table(REQUESTS)?;
        txn.open_table(REQUEST_BODIES)?;
        txn.open_table(NAMES)?;
        txn.open_table(EVENTS)?;
        txn.open_table(EVENT_ORDER)?;
        txn.open_table(LIVE)?;
        txn.open_table(LEASES)?;
        txn.open_table(ROUTES)?;
        txn.open_table(OUTBOX)?;
        txn.open_table(IMAGES)?;
        // Derived tables are kept in step by every commit that changes what they index;
        // a file written before they existed (or by another build of them) gets them
        // rebuilt, once.
        if meta.get("index_version")?.map(|v| v.value()) != Some(INDEX_VERSION) {
            meta.insert("index_version", INDEX_VERSION)?;
            drop(meta);
            history::rebuild_indexes(&txn)?;
        }
    }
    commit(txn)?;
    Ok(db)
}

/// What admission counts of a machine not destroyed.
fn live_value(rec: &MachineRecord) -> (u32, u64) {
    (rec.spec.vcpus, u64::from(rec.spec.memory_mib))
}

fn usage_of<T: ReadableTable<&'static str, (u32, u64)>>(live: &T) -> Result<Usage, StoreError> {
    let mut usage = Usage::default();
    for entry in live.iter()? {
        let (_, value) = entry?;
        let (vcpus, memory_mib) = value.value();
        usage.add(vcpus, memory_mib);
    }
    Ok(usage)
}

/// Refuses a new machine the host has no room for (see `machine::admission::admit`).
fn admit<T: ReadableTable<&'static str, (u32, u64)>>(
    live: &T,
    rec: &MachineRecord,
    room: Room,
) -> Result<(), StoreError> {
    admission::admit(usage_of(live)?, &rec.spec, room).map_err(StoreError::NoRoom)
}

fn next_seq(txn: &redb::WriteTransaction, key: &str) -> Result<u64, StoreError> {
    let mut meta = txn.open_table(META)?;
    let seq = meta.get(key)?.map_or(0, |v| v.value()) + 1;
    meta.insert(key, seq)?;
    Ok(seq)
}

fn enqueue(
    txn: &redb::WriteTransaction,
    change: RouteChange,
) -> Result<(u64, RouteChange), StoreError> {
    let seq = next_seq(txn, "outbox_seq")?;
    let mut outbox = txn.open_table(OUTBOX)?;
    outbox.insert(seq, encode(&change)?.as_slice())?;
    Ok((seq, change))
}

#[cfg(test)]
mod tests;
