//! What the store keeps of the past, and for how long: each machine's events are capped
//! (its first few and its last many), a destroyed machine is compacted away after a
//! retention, and history is read in pages. Without these a guest that crash-loops, or a
//! host that runs machines for months, would grow the file and every full read of it
//! without bound.
//!
//! The derived tables (`live`, `event_order`) are rebuilt from the records and the events
//! at every open, so they can never disagree with what they index.

use redb::{ReadableTable, WriteTransaction};

use super::codec::{decode, encode};
use super::{
    EVENT_ORDER, EVENTS, LIVE, MACHINES, NAMES, REQUEST_BODIES, REQUESTS, Store, StoreError,
    live_value, next_seq,
};
use crate::machine::record::{MachineEvent, MachineRecord, MachineState};

/// How much of one machine's event history is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryBounds {
    /// Events kept from the start (creation and the first run).
    pub first: u32,
    /// Events kept from the end; those between are dropped as new ones come.
    pub last: u32,
}

impl Default for HistoryBounds {
    fn default() -> Self {
        HistoryBounds {
            first: 16,
            last: 256,
        }
    }
}

/// Appends an event for `rec` and, past the machine's bound, drops the oldest event
/// after its first ones (so the log keeps how the machine began and what it did last).
pub(super) fn append_event(
    txn: &WriteTransaction,
    rec: &MachineRecord,
    message: String,
    bounds: HistoryBounds,
) -> Result<MachineEvent, StoreError> {
    let seq = next_seq(txn, "event_seq")?;
    let event = MachineEvent {
        seq,
        machine_id: rec.id.clone(),
        at_ms: rec.updated_at_ms,
        state: rec.state,
        // Messages carry guest text (its errors, its console's tail): never unbounded.
        message: crate::text::bounded(&message, crate::text::MAX_EVENT_MESSAGE),
    };
    let mut events = txn.open_table(EVENTS)?;
    let mut order = txn.open_table(EVENT_ORDER)?;
    events.insert((rec.id.as_str(), seq), encode(&event)?.as_slice())?;
    order.insert(seq, rec.id.as_str())?;
    let kept = (bounds.first as usize).saturating_add(bounds.last as usize);
    let mut dropped = Vec::new();
    {
        let mut count = 0usize;
        let mut middle = Vec::new();
        for entry in events.range((rec.id.as_str(), 0)..=(rec.id.as_str(), u64::MAX))? {
            let (key, _) = entry?;
            count += 1;
            if count > bounds.first as usize {
                middle.push(key.value().1);
            }
        }
        if count > kept {
            dropped.extend(middle.into_iter().take(count - kept));
        }
    }
    for old in dropped {
        events.remove((rec.id.as_str(), old))?;
        order.remove(old)?;
    }
    Ok(event)
}

/// Rebuilds `live` from the records and `event_order` from the events.
pub(super) fn rebuild_indexes(txn: &WriteTransaction) -> Result<(), StoreError> {
    let machines = txn.open_table(MACHINES)?;
    let mut live = txn.open_table(LIVE)?;
    live.retain(|_, _| false)?;
    for entry in machines.iter()? {
        let (id, value) = entry?;
        let rec: MachineRecord = decode(value.value())?;
        if rec.state != MachineState::Destroyed {
            live.insert(id.value(), live_value(&rec))?;
        }
    }
    let events = txn.open_table(EVENTS)?;
    let mut order = txn.open_table(EVENT_ORDER)?;
    order.retain(|_, _| false)?;
    for entry in events.iter()? {
        let (key, _) = entry?;
        let (id, seq) = key.value();
        order.insert(seq, id)?;
    }
    Ok(())
}

/// What one compaction removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Compacted {
    /// The machines whose tombstones went.
    pub machines: Vec<String>,
    /// True when more tombstones were due than one pass takes: run again.
    pub more: bool,
}

/// Most tombstones one compaction commit removes, so a commit stays short however many
/// are due.
const COMPACT_BATCH: usize = 256;

impl Store {
    /// Events with `seq > after`, of one machine or of all, in sequence order, at most
    /// `limit` of them: one page. A reader pages by passing the last seq it got.
    pub fn events_page(
        &self,
        machine: Option<&str>,
        after: u64,
        limit: usize,
    ) -> Result<Vec<MachineEvent>, StoreError> {
        let txn = self.read()?;
        let events = txn.open_table(EVENTS)?;
        let mut out = Vec::new();
        match machine {
            Some(id) => {
                for entry in events.range((id, after.saturating_add(1))..=(id, u64::MAX))? {
                    if out.len() >= limit {
                        break;
                    }
                    let (_, value) = entry?;
                    out.push(decode::<MachineEvent>(value.value())?);
                }
            }
            None => {
                let order = txn.open_table(EVENT_ORDER)?;
                for entry in order.range(after.saturating_add(1)..)? {
                    if out.len() >= limit {
                        break;
                    }
                    let (seq, id) = entry?;
                    if let Some(value) = events.get((id.value(), seq.value()))? {
                        out.push(decode::<MachineEvent>(value.value())?);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Every event with `seq > after` of one machine or of all (tests and small reads;
    /// a stream reads [`Store::events_page`]).
    pub fn events(
        &self,
        machine: Option<&str>,
        after: u64,
    ) -> Result<Vec<MachineEvent>, StoreError> {
        self.events_page(machine, after, usize::MAX)
    }

    /// Removes destroyed machines whose last change is before `before_ms`: the record,
    /// its events, its request id (which may then be used again). At most one batch per
    /// call. Idempotent.
    pub fn compact(&self, before_ms: u64) -> Result<Compacted, StoreError> {
        // Candidates are found in a read transaction, then removed in a write one that
        // checks each again (a record may have changed in between).
        let due = {
            let txn = self.read()?;
            let machines = txn.open_table(MACHINES)?;
            let live = txn.open_table(LIVE)?;
            let mut due = Vec::new();
            for entry in machines.iter()? {
                let (id, value) = entry?;
                if live.get(id.value())?.is_some() {
                    continue;
                }
                let rec: MachineRecord = decode(value.value())?;
                if tombstone_due(&rec, before_ms) {
                    due.push(rec.id);
                }
            }
            due
        };
        if due.is_empty() {
            // No write when nothing is due: a full file system is not touched for nothing.
            return Ok(Compacted::default());
        }
        let more = due.len() > COMPACT_BATCH;
        let txn = self.write()?;
        let mut removed = Vec::new();
        {
            let mut machines = txn.open_table(MACHINES)?;
            let mut requests = txn.open_table(REQUESTS)?;
            let mut bodies = txn.open_table(REQUEST_BODIES)?;
            let names = txn.open_table(NAMES)?;
            let mut events = txn.open_table(EVENTS)?;
            let mut order = txn.open_table(EVENT_ORDER)?;
            for id in due.into_iter().take(COMPACT_BATCH) {
                let Some(rec) = machines
                    .get(id.as_str())?
                    .map(|v| decode::<MachineRecord>(v.value()))
                    .transpose()?
                else {
                    continue;
                };
                if !tombstone_due(&rec, before_ms) {
                    continue;
                }
                // A name is freed when its machine is destroyed; a row still naming this
                // machine would be a bug, and then the record stays.
                if names
                    .get(rec.name.as_str())?
                    .is_some_and(|owner| owner.value() == id)
                {
                    continue;
                }
                machines.remove(id.as_str())?;
                let ours = requests
                    .get(rec.request_id.as_str())?
                    .is_some_and(|owner| owner.value() == id);
                if ours {
                    requests.remove(rec.request_id.as_str())?;
                    bodies.remove(rec.request_id.as_str())?;
                }
                let mut seqs = Vec::new();
                for entry in events.range((id.as_str(), 0)..=(id.as_str(), u64::MAX))? {
                    seqs.push(entry?.0.value().1);
                }
                for seq in seqs {
                    events.remove((id.as_str(), seq))?;
                    order.remove(seq)?;
                }
                removed.push(id);
            }
        }
        super::commit(txn)?;
        Ok(Compacted {
            machines: removed,
            more,
        })
    }
}

/// A destroyed machine last changed before `before_ms`.
fn tombstone_due(rec: &MachineRecord, before_ms: u64) -> bool {
    rec.state == MachineState::Destroyed && rec.updated_at_ms < before_ms
}
