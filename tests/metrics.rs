//! The operator's view of a working daemon: a Prometheus scrape and the JSON log.
//!
//! One daemon with a pool of one prepared machine and `log.format = "json"`; a machine is
//! created and started. Then:
//! - the scrape parses with an exposition-format parser (the `prometheus-parse` crate, and
//!   Prometheus's own Python parser where the venv has it) and shows the step histograms
//!   with counts above zero, machines by state, the pool's levels, the API's latency by
//!   method, and the failure and restart counters at zero;
//! - every metric in the catalogue is exported, and so is every metric the Grafana
//!   dashboard (`deploy/grafana/hearth.json`) queries;
//! - every log line is a JSON object, and every line of a step names its machine and step;
//! - `hearth machine get` draws the run as a timeline, a bar for each step.

mod support;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use hearth::api::pb;
use prometheus_parse::{Scrape, Value};
use support::Daemon;

use support::scrape;

fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(buckets) => buckets
                .iter()
                .find(|b| b.less_than.is_infinite())
                .map(|b| b.count)
                .unwrap_or(0.0),
            Value::Summary(_) => f64::NAN,
        })
}

/// The metric names a dashboard's queries use (histogram series folded to their family).
fn dashboard_metrics(path: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(path).expect("dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    let mut exprs = Vec::new();
    let mut stack = vec![&dashboard];
    while let Some(node) = stack.pop() {
        match node {
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("expr" | "query", serde_json::Value::String(expr)) => {
                            exprs.push(expr.clone())
                        }
                        _ => stack.push(value),
                    }
                }
            }
            serde_json::Value::Array(items) => stack.extend(items),
            _ => {}
        }
    }
    assert!(exprs.len() >= 5, "the dashboard has queries: {exprs:?}");
    let mut names = BTreeSet::new();
    for expr in exprs {
        let mut rest = expr.as_str();
        while let Some(at) = rest.find("hearth_") {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            let name = &tail[..end];
            let family = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            names.insert(family.to_string());
            rest = &tail[end..];
        }
    }
    names
}

/// Prometheus's own parser (the Python client's), where the venv has it.
fn python_parse(text: &str) -> Option<usize> {
    let venv = std::env::var_os("HEARTH_PY_VENV")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from("/opt/hearth/python"));
    let python = venv.join("bin/python");
    let check = std::process::Command::new(&python)
        .args(["-c", "import prometheus_client"])
        .status();
    if !check.is_ok_and(|s| s.success()) {
        support::skipped(
            "metrics (python parser)",
            &format!(
                "no prometheus_client at {} (run deploy/install-deps.sh)",
                python.display()
            ),
        );
        return None;
    }
    let mut child = std::process::Command::new(&python)
        .args([
            "-c",
            "import sys\nfrom prometheus_client.parser import text_string_to_metric_families as p\nprint(len(list(p(sys.stdin.read()))))",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed the scrape");
    let out = child.wait_with_output().expect("python parse");
    assert!(
        out.status.success(),
        "Prometheus's parser refused the scrape: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_and_the_json_log_show_a_machines_run() {
    if support::guest_prereqs::guest_prereqs("metrics").is_none() {
        return;
    }
    let mut daemon = Daemon::prepare(&format!(
        "[log]\nformat = \"json\"\n{}",
        support::demo_pool("warm", 1)
    ));
    let log = daemon.dir.path().join("hearthd.log");
    daemon.spawn_logging(&log);
    let mut client = daemon.client().await;
    let address = support::node(&mut client).await.metrics_address;
    assert!(address.starts_with("127.0.0.1:"), "{address:?}");
    support::wait_pool(&mut client, "warm", 1, Duration::from_secs(240)).await;
    // A cold create (another shape than the pool's), started.
    let mut request = support::demo_request("m-1", "metered", &[]);
    if let Some(spec) = request.spec.as_mut() {
        spec.memory_mib = 160;
    }
    let created = client
        .machines
        .create_machine(request)
        .await
        .expect("create")
        .into_inner();
    let started = support::wait_for(&mut client, &created.id, pb::MachineState::Started).await;

    let text = scrape(&address);
    let parsed = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("parse");
    for step in ["image", "disk", "network", "vmm", "ready", "publish"] {
        let count = value(
            &parsed,
            "hearth_step_duration_seconds",
            &[("step", step), ("direction", "acquire")],
        );
        assert!(
            count.is_some_and(|c| c >= 1.0),
            "step {step}: histogram count {count:?}"
        );
    }
    assert_eq!(
        value(&parsed, "hearth_machines", &[("state", "started")]),
        Some(1.0)
    );
    assert_eq!(
        value(&parsed, "hearth_machines", &[("state", "prepared")]),
        Some(1.0)
    );
    assert_eq!(
        value(&parsed, "hearth_machines", &[("state", "failed")]),
        Some(0.0)
    );
    assert_eq!(
        value(&parsed, "hearth_pool_ready", &[("pool", "warm")]),
        Some(1.0)
    );
    assert_eq!(
        value(&parsed, "hearth_pool_size", &[("pool", "warm")]),
        Some(1.0)
    );
    let creates = value(
        &parsed,
        "hearth_api_request_duration_seconds",
        &[("method", "MachineService/CreateMachine")],
    );
    assert_eq!(creates, Some(1.0), "one CreateMachine call");
    assert_eq!(
        value(
            &parsed,
            "hearth_step_failures_total",
            &[
                ("step", "vmm"),
                ("direction", "acquire"),
                ("class", "permanent")
            ]
        ),
        Some(0.0)
    );
    assert_eq!(
        value(
            &parsed,
            "hearth_actor_restarts_total",
            &[("actor", "machine")]
        ),
        Some(0.0)
    );
    // The publisher drains the outbox just after it answers the publish step, so the
    // scrape may see the change still queued; it must be gone soon after.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut depth = value(&parsed, "hearth_outbox_depth", &[]);
    while depth != Some(0.0) {
        assert!(
            std::time::Instant::now() < deadline && depth.is_some(),
            "the outbox never drained: {depth:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
        let again = scrape(&address);
        let parsed = Scrape::parse(again.lines().map(|l| Ok(l.to_string()))).expect("parse");
        depth = value(&parsed, "hearth_outbox_depth", &[]);
    }
    assert!(value(&parsed, "hearth_resident_memory_bytes", &[]).is_some_and(|b| b > 1e6));

    let exported: BTreeSet<&str> = parsed.samples.iter().map(|s| s.metric.as_str()).collect();
    // The sink gauges exist only with a sink configured (tests/etcd_sink.rs reads them).
    let sinkless = |name: &str| name.starts_with("hearth_sink_");
    for metric in hearth::metrics::CATALOGUE
        .iter()
        .filter(|m| !sinkless(m.name))
    {
        assert!(
            exported.contains(metric.name),
            "{} not exported",
            metric.name
        );
        assert!(
            parsed.docs.contains_key(metric.name),
            "{} has no help",
            metric.name
        );
    }
    let dashboard = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/hearth.json");
    let queried = dashboard_metrics(&dashboard);
    println!("the dashboard queries {queried:?}");
    for name in &queried {
        let declared = hearth::metrics::CATALOGUE.iter().any(|m| m.name == name);
        assert!(
            declared,
            "the dashboard queries {name}, which is not declared"
        );
        assert!(
            exported.contains(name.as_str()) || sinkless(name),
            "the dashboard queries {name}, which is not exported"
        );
    }
    if let Some(families) = python_parse(&text) {
        println!("Prometheus's parser: {families} families");
        let expected = hearth::metrics::CATALOGUE
            .iter()
            .filter(|m| !sinkless(m.name))
            .count();
        assert!(families >= expected, "{families} < {expected}");
    }
    // Anything but /metrics is not found.
    let mut stream = std::net::TcpStream::connect(&address).expect("connect");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: hearth\r\nConnection: close\r\n\r\n")
        .expect("send");
    let mut reply = String::new();
    stream.read_to_string(&mut reply).expect("read");
    assert!(reply.starts_with("HTTP/1.1 404"), "{reply}");

    // The operator's view of the same run: a timeline, one bar per step.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hearth"))
        .arg("--socket")
        .arg(daemon.dir.path().join("api.sock"))
        .args(["machine", "get", &started.id])
        .output()
        .expect("run hearth");
    let shown = String::from_utf8_lossy(&out.stdout);
    println!("{shown}");
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains("TIMELINE"), "{shown}");
    let bars: Vec<&str> = shown.lines().filter(|l| l.contains('█')).collect();
    for step in ["image", "disk", "vmm", "ready", "publish"] {
        assert!(
            bars.iter().any(|l| l.contains(&format!(" {step} "))),
            "no bar for {step}: {shown}"
        );
    }

    support::destroy(&mut client, &started.id).await;
    let _ = support::drain_pools(&mut daemon).await;
    drop(client);

    // The JSON log: every line an object; a step's lines name the machine and the step.
    let text = std::fs::read_to_string(&log).expect("log");
    let mut step_lines = 0;
    let mut ours = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let object: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        let spans = object["spans"].as_array().cloned().unwrap_or_default();
        let in_step = object["span"]["name"] == "step";
        let in_machine = spans.iter().any(|s| s["name"] == "machine");
        if in_step {
            assert!(in_machine, "a step's line is in its machine's span: {line}");
            step_lines += 1;
            let span = &object["span"];
            assert!(span["machine"].is_string(), "{line}");
            assert!(span["step"].is_string(), "{line}");
            assert!(span["direction"].is_string(), "{line}");
            if span["machine"] == created.id.as_str() {
                ours += 1;
            }
        } else if in_machine {
            assert!(object["span"]["machine"].is_string(), "{line}");
        }
    }
    println!("{step_lines} step lines, {ours} of the created machine");
    assert!(
        ours >= 6,
        "the created machine's steps are in the log:\n{text}"
    );
}

/// Metrics are optional: when their address is taken, the daemon logs it and serves its
/// API without them (GetNode reports no metrics address).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_metrics_address_does_not_stop_the_daemon() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("hold a port");
    let address = taken.local_addr().expect("address").to_string();
    let mut daemon = Daemon::prepare("");
    daemon.rewrite_config(|text| {
        text.replacen(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"{address}\""),
            1,
        )
    });
    let log = daemon.dir.path().join("hearthd.log");
    daemon.spawn_logging(&log);
    let mut client = daemon.client().await;
    let node = support::node(&mut client).await;
    assert_eq!(
        node.metrics_address, "",
        "no metrics while {address} is taken"
    );
    let said = std::fs::read_to_string(&log).expect("log");
    assert!(
        said.contains("metrics.listen") && said.contains(&address),
        "the log names the key and the address: {said}"
    );
}
