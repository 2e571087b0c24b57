//! Generated requests, valid and hostile alike, across every RPC and in random order,
//! against a real hearthd on its socket: huge and control-character strings, path-like
//! ids, absurd numbers, unknown enum values, ids of other machines, request ids reused
//! with other bodies. Every answer must be a clean status (a code a caller can act on, a
//! bounded message without control characters), the daemon must stay alive with its
//! memory bounded, every machine created must be destroyable, and the audit must be clean
//! at the end.
//!
//! `HEARTH_FUZZ_CASES` sets the number of requests (default 1,000); `HEARTH_FUZZ_SEED`
//! replays a run (the seed is printed).

mod support;

use std::time::{Duration, Instant};

use hearth::api::pb;
use hearth::client::Client;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{RngAlgorithm, TestRng, TestRunner};
use support::Daemon;
use tonic::Code;

/// One generated call.
#[derive(Debug, Clone)]
enum Op {
    Create {
        request_id: String,
        name: String,
        spec: Option<Box<pb::MachineSpec>>,
    },
    Get(Target),
    Start(Target),
    Stop(Target),
    Destroy(Target),
    List {
        destroyed: bool,
        prepared: bool,
    },
    Wait {
        target: Target,
        state: i32,
        timeout_ms: u32,
    },
    Watch {
        target: Target,
        after_seq: u64,
    },
    Node,
    Audit,
    Routes,
    WatchRoutes,
    Pull(String),
    Images,
    RemoveImage(String),
    Prune,
}

/// A machine id: one of the machines made so far (by index), or anything.
#[derive(Debug, Clone)]
enum Target {
    Known(usize),
    Raw(String),
}

/// Strings a hostile caller sends: empty, plausible, path-like, control characters,
/// any Unicode, and huge.
fn hostile_string() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z0-9-]{1,12}",
        2 => Just(String::new()),
        2 => prop::sample::select(vec![
            "..", ".", "../../etc/passwd", "/proc/self/mem", "a/b", "%2e%2e", "demo",
            "0123456789", "ffffffffff", "web", "-", "a..b", "\u{0}", "sha256:00",
        ]).prop_map(str::to_string),
        2 => "[\\x00-\\x1f\\x7f]{1,16}",
        2 => "\\PC{0,40}",
        1 => (any::<char>(), 1usize..=(1 << 20)).prop_map(|(c, n)| c.to_string().repeat(n)),
        1 => (0usize..=(64 << 10)).prop_map(|n| "\u{1b}[2J".repeat(n / 4)),
    ]
}

/// Request ids: a small shared set, so retries and reuses with other bodies happen.
fn request_id() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => (0u8..12).prop_map(|n| format!("req-{n}")),
        1 => hostile_string(),
    ]
}

/// Names: a small shared set (so names collide), or anything.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => (0u8..8).prop_map(|n| format!("m{n}")),
        1 => hostile_string(),
    ]
}

/// Absurd and ordinary numbers alike.
fn number() -> impl Strategy<Value = u32> {
    prop_oneof![4 => 0u32..=4, 2 => 64u32..=8192, 1 => any::<u32>()]
}

fn list(item: impl Strategy<Value = String>, max: usize) -> impl Strategy<Value = Vec<String>> {
    prop_oneof![
        6 => Just(Vec::new()),
        3 => prop::collection::vec(item, 0..4),
        1 => (0usize..=max).prop_map(|n| vec!["x".to_string(); n]),
    ]
}

/// A spec: most are valid demo machines (one vCPU, 128 MiB, the image's default
/// workload), the rest have any field hostile.
fn spec() -> impl Strategy<Value = Option<Box<pb::MachineSpec>>> {
    let valid = Just(pb::MachineSpec {
        image: "demo".into(),
        vcpus: 1,
        memory_mib: 128,
        ports: vec![80],
        ..Default::default()
    });
    let hostile = (
        prop_oneof![3 => Just("demo".to_string()), 1 => hostile_string()],
        number(),
        number(),
        list(hostile_string(), 300),
        prop::collection::btree_map(hostile_string(), hostile_string(), 0..3),
        prop::collection::vec(any::<u32>(), 0..5),
        list(hostile_string(), 300),
        prop_oneof![3 => Just(String::new()), 1 => hostile_string()],
        prop_oneof![3 => Just(String::new()), 1 => hostile_string()],
        prop_oneof![3 => Just(0u32), 1 => any::<u32>()],
        prop_oneof![3 => Just(String::new()), 1 => hostile_string()],
    )
        .prop_map(
            |(
                image,
                vcpus,
                memory_mib,
                command,
                env,
                ports,
                entrypoint,
                workdir,
                user,
                disk_mib,
                pool,
            )| {
                pb::MachineSpec {
                    image,
                    vcpus,
                    memory_mib,
                    command,
                    env: env.into_iter().collect(),
                    ports,
                    entrypoint,
                    workdir,
                    user,
                    disk_mib,
                    pool,
                }
            },
        );
    prop_oneof![
        3 => valid.prop_map(|s| Some(Box::new(s))),
        6 => hostile.prop_map(|s| Some(Box::new(s))),
        1 => Just(None),
    ]
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        3 => any::<usize>().prop_map(Target::Known),
        1 => hostile_string().prop_map(Target::Raw),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (request_id(), name(), spec())
            .prop_map(|(request_id, name, spec)| Op::Create { request_id, name, spec }),
        4 => target().prop_map(Op::Get),
        2 => target().prop_map(Op::Start),
        2 => target().prop_map(Op::Stop),
        2 => target().prop_map(Op::Destroy),
        2 => (any::<bool>(), any::<bool>())
            .prop_map(|(destroyed, prepared)| Op::List { destroyed, prepared }),
        2 => (target(), prop_oneof![0i32..=10, any::<i32>()], 0u32..=30)
            .prop_map(|(target, state, timeout_ms)| Op::Wait { target, state, timeout_ms }),
        2 => (target(), prop_oneof![Just(0u64), any::<u64>()])
            .prop_map(|(target, after_seq)| Op::Watch { target, after_seq }),
        2 => Just(Op::Node),
        1 => Just(Op::Audit),
        1 => Just(Op::Routes),
        1 => Just(Op::WatchRoutes),
        1 => hostile_string().prop_map(Op::Pull),
        1 => Just(Op::Images),
        1 => hostile_string().prop_map(Op::RemoveImage),
        1 => Just(Op::Prune),
    ]
}

/// An image reference the daemon would fetch from a registry is pointed at a port on
/// loopback where nothing listens: a fuzz run never reaches outside the host.
fn contained(image: String) -> String {
    match hearth::image::ImageRef::parse(&image) {
        Ok(hearth::image::ImageRef::Oci(_)) => "127.0.0.1:1/fuzz/nothing:here".to_string(),
        _ => image,
    }
}

/// The codes a hostile request may get: each tells the caller what to do.
const CLEAN: &[Code] = &[
    Code::InvalidArgument,
    Code::NotFound,
    Code::AlreadyExists,
    Code::FailedPrecondition,
    Code::ResourceExhausted,
    Code::OutOfRange,
    Code::Unavailable,
];

/// Longest status message a caller may get back.
const MAX_MESSAGE: usize = 8192;

#[derive(Default)]
struct Tally {
    ok: usize,
    by_code: std::collections::BTreeMap<String, usize>,
    /// One message per code and call, to show what the answers looked like.
    samples: std::collections::BTreeMap<String, String>,
    dirty: Vec<String>,
}

impl Tally {
    fn answer<T>(&mut self, what: &str, result: Result<T, tonic::Status>) -> Option<T> {
        match result {
            Ok(value) => {
                self.ok += 1;
                Some(value)
            }
            Err(status) => {
                self.status(what, &status);
                None
            }
        }
    }

    fn status(&mut self, what: &str, status: &tonic::Status) {
        *self
            .by_code
            .entry(format!("{:?}", status.code()))
            .or_default() += 1;
        let message = status.message();
        self.samples
            .entry(format!("{what} {:?}", status.code()))
            .or_insert_with(|| hearth::text::bounded_printable(message, 160));
        let clean = CLEAN.contains(&status.code())
            && message.len() <= MAX_MESSAGE
            && !message.chars().any(|c| c.is_control() && c != '\n');
        if !clean {
            self.dirty.push(format!(
                "{what}: {:?} ({} bytes) {:?}",
                status.code(),
                message.len(),
                hearth::text::bounded(message, 300)
            ));
        }
    }
}

fn seed() -> [u8; 32] {
    let mut seed = [0u8; 32];
    match std::env::var("HEARTH_FUZZ_SEED") {
        Ok(hex) => {
            let bytes = hex::decode(hex.trim()).expect("HEARTH_FUZZ_SEED: 64 hex characters");
            seed.copy_from_slice(&bytes);
        }
        Err(_) => getrandom::fill(&mut seed).expect("random"),
    }
    seed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_hostile_requests_get_clean_answers_and_leave_nothing() {
    let cases: usize = std::env::var("HEARTH_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let seed = seed();
    println!(
        "api_fuzz: {cases} requests, HEARTH_FUZZ_SEED={}",
        hex::encode(seed)
    );
    // Room for three guests at a time: the valid creates boot real machines.
    let mut daemon =
        Daemon::start_with("[vmm]\nkind = \"qemu\"\n[capacity]\nvcpus = 3\nmemory_mib = 768\n");
    let mut client = daemon.client().await;
    let rss_launched = daemon.rss_kib().expect("rss");
    // The baseline is taken once the daemon has done its one-off work: the first machine
    // builds the guest kit and the demo image, and faults in the code of a whole run.
    let warm_up = client
        .machines
        .create_machine(support::demo_request("fuzz-warm-up", "warm-up", &[]))
        .await
        .expect("warm-up create")
        .into_inner();
    support::wait_for(&mut client, &warm_up.id, pb::MachineState::Started).await;
    support::destroy(&mut client, &warm_up.id).await;
    let rss_start = daemon.rss_kib().expect("rss");
    println!("api_fuzz: RSS {rss_launched} KiB launched, {rss_start} KiB after a first machine");
    let mut runner = TestRunner::new_with_rng(
        proptest::test_runner::Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed),
    );
    let strategy = op();
    let mut known: Vec<String> = Vec::new();
    let mut tally = Tally::default();
    let mut rss_max = rss_start;
    let began = Instant::now();
    for i in 0..cases {
        let op = strategy.new_tree(&mut runner).expect("generate").current();
        run(&mut client, op, &mut known, &mut tally).await;
        if i % 50 == 0 {
            rss_max = rss_max.max(daemon.rss_kib().expect("the daemon is alive"));
        }
    }
    let took = began.elapsed();
    assert!(
        !daemon.wait_exit(Duration::ZERO).await,
        "hearthd died during the run"
    );
    let rss_end = daemon.rss_kib().expect("rss");
    println!(
        "api_fuzz: {cases} requests in {:.1} s: {} ok, by code {:?}; {} machines made",
        took.as_secs_f64(),
        tally.ok,
        tally.by_code,
        known.len()
    );
    println!("api_fuzz: RSS start {rss_start} KiB, max {rss_max} KiB, end {rss_end} KiB");
    for (call, message) in &tally.samples {
        println!("  {call}: {message}");
    }
    assert!(
        tally.dirty.is_empty(),
        "unclean answers: {:#?}",
        tally.dirty
    );

    // Every machine made can be destroyed, and then nothing is left.
    for machine in support::all_machines(&mut client).await {
        if machine.state != pb::MachineState::Destroyed as i32 {
            support::destroy(&mut client, &machine.id).await;
        }
    }
    assert!(
        rss_end <= 2 * rss_start,
        "RSS grew from {rss_start} KiB to {rss_end} KiB"
    );
    support::assert_audit_clean(&mut client).await;
    daemon.assert_no_host_leftovers();
    daemon.kill();
}

fn id_of(target: &Target, known: &[String]) -> String {
    match target {
        Target::Known(i) if !known.is_empty() => known[i % known.len()].clone(),
        Target::Known(_) => "0000000000".to_string(),
        Target::Raw(raw) => raw.clone(),
    }
}

/// Reads a stream for a moment (or to its end), checking every status it carries.
async fn drain<T>(
    what: &str,
    stream: Result<tonic::Response<tonic::Streaming<T>>, tonic::Status>,
    patience: Duration,
    tally: &mut Tally,
) {
    let Some(response) = tally.answer(what, stream) else {
        return;
    };
    let mut stream = response.into_inner();
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) | Err(_) => return,
            Ok(Err(status)) => {
                tally.status(what, &status);
                return;
            }
        }
    }
}

async fn run(client: &mut Client, op: Op, known: &mut Vec<String>, tally: &mut Tally) {
    let machine_ref = |target: &Target, known: &[String]| pb::MachineRef {
        id: id_of(target, known),
    };
    match op {
        Op::Create {
            request_id,
            name,
            spec,
        } => {
            let spec = spec.map(|s| {
                let mut s = *s;
                s.image = contained(std::mem::take(&mut s.image));
                s
            });
            let request = pb::CreateMachineRequest {
                request_id,
                name,
                spec,
                start: None,
            };
            let made = client.machines.create_machine(request).await;
            if let Some(machine) = tally.answer("create", made) {
                let machine = machine.into_inner();
                if !known.contains(&machine.id) {
                    known.push(machine.id);
                }
            }
        }
        Op::Get(t) => {
            let r = client.machines.get_machine(machine_ref(&t, known)).await;
            tally.answer("get", r);
        }
        Op::Start(t) => {
            let r = client.machines.start_machine(machine_ref(&t, known)).await;
            tally.answer("start", r);
        }
        Op::Stop(t) => {
            let r = client.machines.stop_machine(machine_ref(&t, known)).await;
            tally.answer("stop", r);
        }
        Op::Destroy(t) => {
            let r = client
                .machines
                .destroy_machine(machine_ref(&t, known))
                .await;
            tally.answer("destroy", r);
        }
        Op::List {
            destroyed,
            prepared,
        } => {
            let r = client
                .machines
                .list_machines(pb::ListMachinesRequest {
                    include_destroyed: destroyed,
                    include_prepared: prepared,
                })
                .await;
            tally.answer("list", r);
        }
        Op::Wait {
            target,
            state,
            timeout_ms,
        } => {
            let r = client
                .machines
                .wait_machine(pb::WaitMachineRequest {
                    id: id_of(&target, known),
                    state,
                    timeout_ms,
                })
                .await;
            tally.answer("wait", r);
        }
        Op::Watch { target, after_seq } => {
            let r = client
                .machines
                .watch_events(pb::WatchEventsRequest {
                    machine_id: id_of(&target, known),
                    after_seq,
                    history_only: false,
                })
                .await;
            drain("watch", r, Duration::from_millis(20), tally).await;
        }
        Op::Node => {
            let r = client.node.get_node(pb::GetNodeRequest {}).await;
            tally.answer("node", r);
        }
        Op::Audit => {
            let r = client.node.audit(pb::AuditRequest {}).await;
            tally.answer("audit", r);
        }
        Op::Routes => {
            let r = client.registry.list_routes(pb::ListRoutesRequest {}).await;
            tally.answer("routes", r);
        }
        Op::WatchRoutes => {
            let r = client
                .registry
                .watch_routes(pb::WatchRoutesRequest {})
                .await;
            drain("watch routes", r, Duration::from_millis(20), tally).await;
        }
        Op::Pull(image) => {
            let r = client
                .images
                .pull_image(pb::PullImageRequest {
                    image: contained(image),
                })
                .await;
            drain("pull", r, Duration::from_secs(30), tally).await;
        }
        Op::Images => {
            let r = client.images.list_images(pb::ListImagesRequest {}).await;
            tally.answer("images", r);
        }
        Op::RemoveImage(image) => {
            let r = client
                .images
                .remove_image(pb::RemoveImageRequest { image })
                .await;
            tally.answer("remove image", r);
        }
        Op::Prune => {
            let r = client.images.prune_images(pb::PruneImagesRequest {}).await;
            tally.answer("prune", r);
        }
    }
}
