//! Store tests on real redb files.

use super::*;
use crate::machine::claim::Claim;
use crate::machine::record::Pooled;
use crate::machine::record::{Desired, DiskLayout};
use crate::machine::spec::MachineSpec;
use crate::machine::step::{Mark, Step};
use std::net::Ipv4Addr;

const ROOM: Room = Room {
    vcpus: 8,
    memory_mib: 1024,
    slots: 16,
};

/// The body of a create (any fixed digest will do for tests that retry nothing).
const BODY: RequestBody = RequestBody([7; 32]);

fn spec(vcpus: u32, memory_mib: u32) -> MachineSpec {
    MachineSpec {
        image: "demo".into(),
        vcpus,
        memory_mib,
        command: vec![],
        env: vec![],
        ports: vec![80],
        ..MachineSpec::default()
    }
}

fn rec(id: &str, name: &str, request: &str) -> MachineRecord {
    MachineRecord::new(id.into(), name.into(), request.into(), spec(1, 128), 1)
}

fn open() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("hearth.redb")).expect("open");
    (dir, store)
}

#[test]
fn create_is_idempotent_by_request_id_and_names_are_unique() {
    let (_dir, store) = open();
    let first = store
        .create_machine(rec("aaaaaaaaaa", "web", "r1"), ROOM, BODY)
        .expect("create");
    assert!(matches!(first, Created::New(..)));
    match store
        .create_machine(rec("bbbbbbbbbb", "web", "r1"), ROOM, BODY)
        .expect("retry")
    {
        Created::Existing(found) => assert_eq!(found.id, "aaaaaaaaaa"),
        other => panic!("expected the first machine, got {other:?}"),
    }
    // The same request id with another body is refused, naming the first machine.
    let err = store
        .create_machine(rec("bbbbbbbbbb", "other", "r1"), ROOM, RequestBody([8; 32]))
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::RequestReused { request_id, id } if request_id == "r1" && id == "aaaaaaaaaa"),
        "{err}"
    );
    assert!(err.to_string().starts_with("request_id:"), "{err}");
    assert!(matches!(
        store.machine_by_request("r1", RequestBody([8; 32])),
        Err(StoreError::RequestReused { .. })
    ));
    assert!(
        store
            .machine_by_request("r1", BODY)
            .expect("same body")
            .is_some()
    );
    let err = store
        .create_machine(rec("cccccccccc", "web", "r2"), ROOM, BODY)
        .unwrap_err();
    assert!(matches!(err, StoreError::NameTaken { .. }), "{err}");
    assert!(store.machine("cccccccccc").expect("read").is_none());
}

#[test]
fn admission_counts_machines_not_destroyed() {
    let (_dir, store) = open();
    let mut big = rec("aaaaaaaaaa", "a", "r1");
    big.spec = spec(6, 512);
    store.create_machine(big, ROOM, BODY).expect("fits");
    let mut second = rec("bbbbbbbbbb", "b", "r2");
    second.spec = spec(4, 128);
    let err = store
        .create_machine(second.clone(), ROOM, BODY)
        .unwrap_err();
    assert!(matches!(err, StoreError::NoRoom(_)), "{err}");
    store
        .update_machine("aaaaaaaaaa", |r| {
            r.desired = Desired::Destroyed;
            r.state = MachineState::Destroyed;
            Ok(Some("destroyed".into()))
        })
        .expect("update");
    store
        .create_machine(second, ROOM, BODY)
        .expect("room after destroy");
    // The destroyed machine's name is free again.
    store
        .create_machine(rec("cccccccccc", "a", "r3"), ROOM, BODY)
        .expect("name reused");
}

#[test]
fn events_are_appended_in_order_per_machine() {
    let (_dir, store) = open();
    store
        .create_machine(rec("aaaaaaaaaa", "a", "r1"), ROOM, BODY)
        .expect("a");
    store
        .create_machine(rec("bbbbbbbbbb", "b", "r2"), ROOM, BODY)
        .expect("b");
    for i in 0..3 {
        store
            .update_machine("aaaaaaaaaa", |_| Ok(Some(format!("step {i}"))))
            .expect("update");
    }
    let a = store.events(Some("aaaaaaaaaa"), 0).expect("events");
    assert_eq!(a.len(), 4);
    assert!(a.windows(2).all(|w| w[0].seq < w[1].seq));
    let after = store.events(Some("aaaaaaaaaa"), a[1].seq).expect("events");
    assert_eq!(after.len(), 2);
    assert_eq!(store.events(None, 0).expect("all").len(), 5);
}

#[test]
fn refused_update_changes_nothing() {
    let (_dir, store) = open();
    store
        .create_machine(rec("aaaaaaaaaa", "a", "r1"), ROOM, BODY)
        .expect("a");
    let err = store
        .update_machine("aaaaaaaaaa", |r| {
            r.desired = Desired::Stopped;
            Err::<Option<String>, _>(StoreError::Refused("no".into()))
        })
        .unwrap_err();
    assert!(matches!(err, StoreError::Refused(_)));
    let found = store.machine("aaaaaaaaaa").expect("read").expect("exists");
    assert_eq!(found.desired, Desired::Started);
    assert!(matches!(
        store.update_machine("zzzzzzzzzz", |_| Ok(None::<String>)),
        Err(StoreError::NotFound(_))
    ));
}

#[test]
fn leases_are_idempotent_and_bounded() {
    let (_dir, store) = open();
    assert_eq!(store.lease("a", 2).expect("a"), 0);
    assert_eq!(store.lease("a", 2).expect("again"), 0);
    assert_eq!(store.lease("b", 2).expect("b"), 1);
    assert!(matches!(store.lease("c", 2), Err(StoreError::NoRoom(_))));
    store.release_lease("a").expect("release");
    store.release_lease("a").expect("release twice");
    assert_eq!(store.lease("c", 2).expect("reuse"), 0);
    assert_eq!(store.leases().expect("list").len(), 2);
}

#[test]
fn routes_and_outbox() {
    let (_dir, store) = open();
    let route = Route {
        machine_id: "aaaaaaaaaa".into(),
        name: "a".into(),
        ip: Ipv4Addr::new(10, 0, 0, 6),
        ports: vec![80],
    };
    assert!(store.publish_route(&route).expect("publish").is_some());
    assert!(store.publish_route(&route).expect("again").is_none());
    assert_eq!(store.routes().expect("routes"), vec![route.clone()]);
    let (seq, _) = store
        .unpublish_route("aaaaaaaaaa")
        .expect("unpublish")
        .expect("queued");
    assert!(
        store
            .unpublish_route("aaaaaaaaaa")
            .expect("again")
            .is_none()
    );
    assert_eq!(store.outbox().expect("outbox").len(), 2);
    store.ack_outbox(seq).expect("ack");
    assert!(store.outbox().expect("outbox").is_empty());
    assert!(store.routes().expect("routes").is_empty());
}

#[test]
fn survives_reopen_and_refuses_a_second_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hearth.redb");
    {
        let store = Store::open(&path).expect("open");
        store
            .create_machine(rec("aaaaaaaaaa", "a", "r1"), ROOM, BODY)
            .expect("a");
        assert!(Store::open(&path).is_err(), "a second open must fail");
    }
    let store = Store::open(&path).expect("reopen");
    assert_eq!(store.machines().expect("list").len(), 1);
}

#[test]
fn a_held_lock_is_waited_for_within_patience_and_refused_after() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hearth.redb");
    let first = Store::open(&path).unwrap();
    let err = Store::open(&path).err().expect("the lock is held");
    assert!(err.to_string().contains("already open"), "{err}");
    let short = Store::open_waiting(&path, std::time::Duration::from_millis(100));
    assert!(short.is_err(), "still held after the patience ran out");
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(150));
        drop(first);
    });
    let second = Store::open_waiting(&path, std::time::Duration::from_secs(10));
    releaser.join().unwrap();
    assert!(second.is_ok(), "{:?}", second.err());
}

/// A prepared machine of `pool`, settled ready (every step but publish done) unless
/// `ready` is false, created at `at`.
fn prepared(id: &str, pool: &str, at: u64, ready: bool) -> MachineRecord {
    let mut rec = MachineRecord::new(id.into(), String::new(), String::new(), spec(1, 128), at);
    rec.desired = Desired::Prepared;
    rec.pooled = Some(Pooled {
        pool: pool.into(),
        claimed: false,
    });
    if ready {
        rec.state = MachineState::Prepared;
        for step in crate::machine::step::PREPARE_ORDER {
            rec.set_mark(step, Mark::Done);
        }
    }
    rec
}

fn claim(pool: &str, request_id: &str, name: &str) -> ClaimRequest {
    let mut wanted = spec(1, 128);
    wanted.env = vec![("WHO".into(), name.into())];
    ClaimRequest {
        claim: Claim {
            pool: pool.into(),
            request_id: request_id.into(),
            name: name.into(),
            spec: wanted,
            now_ms: 99,
        },
        body: BODY,
    }
}

#[test]
fn a_claim_takes_the_oldest_ready_machine_once_and_is_idempotent() {
    let (_dir, store) = open();
    for rec in [
        prepared("aaaaaaaaaa", "web", 20, true),
        prepared("bbbbbbbbbb", "web", 10, true),
        prepared("cccccccccc", "web", 5, false),
        prepared("dddddddddd", "other", 1, true),
    ] {
        store.create_prepared(rec, ROOM).expect("prepare");
    }
    // Prepared capacity counts against the node, claimed or not.
    assert_eq!(store.usage().expect("usage").machines, 4);
    let Claimed::New(first, event) = store
        .claim_prepared(claim("web", "r1", "one"))
        .expect("claim")
    else {
        panic!("expected a claim");
    };
    assert_eq!(first.id, "bbbbbbbbbb", "the oldest ready one");
    assert!(
        event
            .message
            .contains("claimed from pool web by request r1")
    );
    assert_eq!(
        (first.name.as_str(), first.request_id.as_str()),
        ("one", "r1")
    );
    assert_eq!(first.desired, Desired::Started);
    assert!(first.claimed() && first.pool_owner().is_none());
    assert_eq!(first.mark(Step::Ready), Mark::Untouched);
    assert_eq!(first.mark(Step::Vmm), Mark::Done);
    assert_eq!(first.spec.env, vec![("WHO".to_string(), "one".to_string())]);
    // Durable as written (the pool tie goes through the record's extension).
    assert_eq!(
        store.machine("bbbbbbbbbb").expect("read"),
        Some(first.clone())
    );
    // A retry returns the same machine and takes no second one.
    match store
        .claim_prepared(claim("web", "r1", "one"))
        .expect("retry")
    {
        Claimed::Existing(found) => assert_eq!(found.id, first.id),
        other => panic!("expected the first claim, got {other:?}"),
    }
    // The name is the caller's now.
    let err = store.claim_prepared(claim("web", "r2", "one")).unwrap_err();
    assert!(matches!(err, StoreError::NameTaken { .. }), "{err}");
    let Claimed::New(second, _) = store
        .claim_prepared(claim("web", "r3", "two"))
        .expect("claim")
    else {
        panic!("expected a second claim");
    };
    assert_eq!(second.id, "aaaaaaaaaa");
    // The one still booting is not ready; the other pool's is not this pool's.
    assert!(matches!(
        store
            .claim_prepared(claim("web", "r4", "three"))
            .expect("claim"),
        Claimed::Empty
    ));
    assert!(
        store
            .machine_by_request("r4", BODY)
            .expect("read")
            .is_none()
    );
}

#[test]
fn a_record_written_before_pools_reads_with_no_pool() {
    // The V2 envelope (no extension) as an older daemon wrote it.
    #[derive(serde::Serialize)]
    enum Envelope<'a> {
        #[allow(dead_code)]
        V1(()),
        V2(&'a MachineRecord),
    }
    let old = rec("aaaaaaaaaa", "web", "r1");
    let bytes = postcard::to_stdvec(&Envelope::V2(&old)).expect("encode");
    let read: MachineRecord = codec::decode(&bytes).expect("decode");
    // Every disk of that time was a full copy.
    assert_eq!(
        read,
        MachineRecord {
            disk_layout: DiskLayout::Copy,
            ..old.clone()
        }
    );
    assert!(read.pooled.is_none());
    let mut pooled = old.clone();
    pooled.pooled = Some(Pooled {
        pool: "web".into(),
        claimed: true,
    });
    let again: MachineRecord =
        codec::decode(&codec::encode(&pooled).expect("encode")).expect("decode");
    assert_eq!(again.pooled, pooled.pooled);
}

#[test]
fn a_record_written_before_the_crash_history_reads_with_none() {
    // The V3 envelope (the pool tie only) as an older daemon wrote it.
    #[derive(serde::Serialize)]
    struct ExtV3 {
        pooled: Option<Pooled>,
    }
    #[derive(serde::Serialize)]
    enum Envelope<'a> {
        #[allow(dead_code)]
        V1(()),
        #[allow(dead_code)]
        V2(()),
        V3(&'a MachineRecord, ExtV3),
    }
    let old = rec("aaaaaaaaaa", "web", "r1");
    let tie = Some(Pooled {
        pool: "web".into(),
        claimed: false,
    });
    let bytes = postcard::to_stdvec(&Envelope::V3(
        &old,
        ExtV3 {
            pooled: tie.clone(),
        },
    ))
    .expect("encode");
    let read: MachineRecord = codec::decode(&bytes).expect("decode");
    assert_eq!(read.pooled, tie);
    assert!(read.crashes.is_empty());
    let mut crashed = read.clone();
    crashed.crashes = vec![5, 9];
    let again: MachineRecord =
        codec::decode(&codec::encode(&crashed).expect("encode")).expect("decode");
    assert_eq!(again, crashed);
}

#[test]
fn a_record_written_before_disk_layouts_reads_as_a_full_copy() {
    // The V4 envelope (pool tie and crash history) as the daemon wrote it before V5.
    #[derive(serde::Serialize)]
    struct ExtV4 {
        pooled: Option<Pooled>,
        crashes: Vec<u64>,
    }
    #[derive(serde::Serialize)]
    enum Envelope<'a> {
        #[allow(dead_code)]
        V1(()),
        #[allow(dead_code)]
        V2(()),
        #[allow(dead_code)]
        V3(()),
        V4(&'a MachineRecord, ExtV4),
    }
    let old = rec("aaaaaaaaaa", "web", "r1");
    assert_eq!(old.disk_layout, DiskLayout::Overlay, "new records default");
    let bytes = postcard::to_stdvec(&Envelope::V4(
        &old,
        ExtV4 {
            pooled: None,
            crashes: vec![7],
        },
    ))
    .expect("encode");
    let read: MachineRecord = codec::decode(&bytes).expect("decode");
    assert_eq!(read.disk_layout, DiskLayout::Copy);
    assert_eq!(read.crashes, vec![7]);
    // Written again (V5), it keeps the layout it read; a new record keeps its own.
    let again: MachineRecord =
        codec::decode(&codec::encode(&read).expect("encode")).expect("decode");
    assert_eq!(again, read);
    let fresh: MachineRecord =
        codec::decode(&codec::encode(&old).expect("encode")).expect("decode");
    assert_eq!(fresh.disk_layout, DiskLayout::Overlay);
}

fn destroy(store: &Store, id: &str, at_ms: u64) {
    store
        .update_machine(id, |r| {
            r.desired = Desired::Destroyed;
            r.state = MachineState::Destroyed;
            r.updated_at_ms = at_ms;
            Ok(Some("destroyed".to_string()))
        })
        .expect("destroy");
}

#[test]
fn a_machine_keeps_its_first_and_last_events_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("hearth.redb"))
        .expect("open")
        .with_history(HistoryBounds { first: 3, last: 5 });
    store
        .create_machine(rec("aaaaaaaaaa", "a", "r1"), ROOM, BODY)
        .expect("a");
    store
        .create_machine(rec("bbbbbbbbbb", "b", "r2"), ROOM, BODY)
        .expect("b");
    for i in 0..100 {
        store
            .update_machine("aaaaaaaaaa", |_| Ok(Some(format!("step {i}"))))
            .expect("update");
    }
    let kept: Vec<String> = store
        .events(Some("aaaaaaaaaa"), 0)
        .expect("events")
        .into_iter()
        .map(|e| e.message)
        .collect();
    assert_eq!(
        kept,
        [
            "created", "step 0", "step 1", "step 95", "step 96", "step 97", "step 98", "step 99"
        ]
    );
    // The other machine's history is its own, and the global order agrees.
    assert_eq!(store.events(Some("bbbbbbbbbb"), 0).expect("b").len(), 1);
    let all = store.events(None, 0).expect("all");
    assert_eq!(all.len(), 9);
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
}

#[test]
fn events_are_read_in_pages_in_global_order() {
    let (_dir, store) = open();
    for (id, name, request) in [("aaaaaaaaaa", "a", "r1"), ("bbbbbbbbbb", "b", "r2")] {
        store
            .create_machine(rec(id, name, request), ROOM, BODY)
            .expect("create");
    }
    for i in 0..10 {
        let id = if i % 2 == 0 {
            "aaaaaaaaaa"
        } else {
            "bbbbbbbbbb"
        };
        store
            .update_machine(id, |_| Ok(Some(format!("e{i}"))))
            .expect("update");
    }
    let whole = store.events(None, 0).expect("all");
    let mut paged = Vec::new();
    let mut last = 0;
    loop {
        let page = store.events_page(None, last, 3).expect("page");
        assert!(page.len() <= 3);
        let Some(end) = page.last() else { break };
        last = end.seq;
        paged.extend(page);
    }
    assert_eq!(paged, whole);
    let one = store.events_page(Some("bbbbbbbbbb"), 0, 2).expect("page");
    assert_eq!(one.len(), 2);
    assert!(one.iter().all(|e| e.machine_id == "bbbbbbbbbb"));
}

#[test]
fn compaction_forgets_old_tombstones_and_frees_their_request_ids() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hearth.redb");
    let store = Store::open(&path).expect("open");
    store
        .create_machine(rec("aaaaaaaaaa", "a", "r1"), ROOM, BODY)
        .expect("a");
    store
        .create_machine(rec("bbbbbbbbbb", "b", "r2"), ROOM, BODY)
        .expect("b");
    store
        .create_machine(rec("cccccccccc", "c", "r3"), ROOM, BODY)
        .expect("c");
    destroy(&store, "aaaaaaaaaa", 1_000);
    destroy(&store, "bbbbbbbbbb", 5_000);
    let done = store.compact(2_000).expect("compact");
    assert_eq!(done.machines, ["aaaaaaaaaa"]);
    assert!(!done.more);
    assert!(store.machine("aaaaaaaaaa").expect("read").is_none());
    assert!(
        store
            .events(Some("aaaaaaaaaa"), 0)
            .expect("events")
            .is_empty()
    );
    assert!(
        store
            .events(None, 0)
            .expect("all")
            .iter()
            .all(|e| e.machine_id != "aaaaaaaaaa")
    );
    // The newer tombstone and the live machine stay; compacting again changes nothing.
    assert!(store.machine("bbbbbbbbbb").expect("read").is_some());
    assert!(store.compact(2_000).expect("again").machines.is_empty());
    // r1 is free: a create with another body under it is new, not refused.
    let again = store
        .create_machine(rec("dddddddddd", "a", "r1"), ROOM, RequestBody([9; 32]))
        .expect("reuse");
    assert!(matches!(again, Created::New(..)));
    // r2's tombstone is still there: its id is still taken.
    assert!(matches!(
        store.create_machine(rec("eeeeeeeeee", "e", "r2"), ROOM, RequestBody([9; 32])),
        Err(StoreError::RequestReused { .. })
    ));
    // The derived index survives a reopen: usage counts what is alive.
    drop(store);
    let store = Store::open(&path).expect("reopen");
    assert_eq!(store.usage().expect("usage").machines, 2);
}

#[test]
fn admission_refuses_when_every_address_block_is_held() {
    let (_dir, store) = open();
    let room = Room { slots: 2, ..ROOM };
    store
        .create_machine(rec("aaaaaaaaaa", "a", "r1"), room, BODY)
        .expect("a");
    store
        .create_machine(rec("bbbbbbbbbb", "b", "r2"), room, BODY)
        .expect("b");
    let err = store
        .create_machine(rec("cccccccccc", "c", "r3"), room, BODY)
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::NoRoom(why) if why.contains("network.pool") && why.contains("2")),
        "{err}"
    );
    destroy(&store, "aaaaaaaaaa", 1);
    store
        .create_machine(rec("cccccccccc", "c", "r3"), room, BODY)
        .expect("room again");
}
