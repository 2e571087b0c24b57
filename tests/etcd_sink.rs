//! The etcd sink against a real etcd (Debian's `etcd-server`, on loopback, one per test):
//! - a started machine appears under both layouts (SkyDNS for CoreDNS, hearth's route
//!   records), and a destroyed one disappears within a second (the sink deletes it; the
//!   lease would take 3 s);
//! - keys planted under this host's names while the daemon was down are removed at start,
//!   another host's are untouched;
//! - etcd killed while machines are destroyed and created: the lifecycles do not stall,
//!   the new machine is started with its publication pending (ListRoutes, GetMachine,
//!   GetNode, the metrics), and once etcd is back it holds exactly the records again;
//! - hearthd killed with SIGKILL and not restarted: its keys expire with its lease
//!   (waited for: TTL + 2 s);
//! - over mutual TLS (etcd requiring a client certificate), the same publication.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hearth::api::pb;
use support::Daemon;
use support::etcd::Etcd;

const HOST: &str = "w1";
const TTL: u32 = 3;

fn ours(keys: &BTreeMap<String, String>) -> Vec<String> {
    keys.keys()
        .filter(|k| {
            k.starts_with(&format!("/hearth/routes/{HOST}/")) || k.ends_with(&format!("/{HOST}"))
        })
        .cloned()
        .collect()
}

/// Waits until etcd's keys satisfy `done` (re-read every 100 ms), up to `limit`.
async fn until(
    etcd: &Etcd,
    limit: Duration,
    what: &str,
    done: impl Fn(&BTreeMap<String, String>) -> bool,
) -> BTreeMap<String, String> {
    let deadline = Instant::now() + limit;
    loop {
        let keys = etcd.keys("/").await.unwrap_or_default();
        if done(&keys) {
            return keys;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {limit:?}; etcd holds {keys:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn published(keys: &BTreeMap<String, String>, machine: &pb::Machine) -> bool {
    let sky = format!("/skydns/internal/hearth/{}/{HOST}", machine.name);
    let by_id = format!("/skydns/internal/hearth/vm/{}/{HOST}", machine.id);
    let route = format!("/hearth/routes/{HOST}/{}", machine.id);
    keys.get(&sky)
        .is_some_and(|v| v.contains(&format!("\"host\":\"{}\"", machine.guest_ip)))
        && keys.contains_key(&by_id)
        && keys.get(&route).is_some_and(|v| v.contains(&machine.id))
}

async fn start(client: &mut hearth::client::Client, request_id: &str, name: &str) -> pb::Machine {
    let created = client
        .machines
        .create_machine(support::demo_request(request_id, name, &[]))
        .await
        .expect("create")
        .into_inner();
    support::wait_for(client, &created.id, pb::MachineState::Started).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_holds_exactly_the_published_routes_through_outages_and_a_crash() {
    if support::guest_prereqs::guest_prereqs("etcd_sink").is_none() {
        return;
    }
    let Some(mut etcd) = Etcd::start("etcd_sink").await else {
        return;
    };
    // Left by an earlier run of this host, and another host's.
    let planted = [
        format!("/hearth/routes/{HOST}/ghost"),
        format!("/skydns/internal/hearth/ghost/{HOST}"),
    ];
    let foreign = ["/hearth/routes/w2/abc", "/skydns/internal/hearth/web/w2"];
    for key in planted.iter().map(String::as_str).chain(foreign) {
        etcd.put(key, "{}").await;
    }
    let mut daemon = Daemon::start_with(&etcd.config(HOST, TTL));
    let mut client = daemon.client().await;
    until(
        &etcd,
        Duration::from_secs(10),
        "planted keys removed",
        |keys| planted.iter().all(|k| !keys.contains_key(k)),
    )
    .await;

    // With etcd up, a destroy removes the keys at once (well within the TTL, so it is
    // the sink deleting them, not the lease expiring).
    let zero = start(&mut client, "e-0", "zero").await;
    until(&etcd, Duration::from_secs(10), "zero published", |keys| {
        published(keys, &zero)
    })
    .await;
    support::destroy(&mut client, &zero.id).await;
    until(
        &etcd,
        Duration::from_secs(1),
        "zero's keys deleted by the sink",
        |keys| {
            !keys
                .keys()
                .any(|k| k.contains(&zero.id) || k.contains("/zero/"))
        },
    )
    .await;

    let first = start(&mut client, "e-1", "first").await;
    let keys = until(&etcd, Duration::from_secs(10), "first published", |keys| {
        published(keys, &first)
    })
    .await;
    for key in foreign {
        assert!(keys.contains_key(key), "another host's {key} was touched");
    }
    println!("published: {:#?}", ours(&keys));

    // etcd goes away: the machines' lives go on.
    etcd.kill();
    support::destroy(&mut client, &first.id).await;
    let second = start(&mut client, "e-2", "second").await;
    println!("while etcd was down: first destroyed, second started");
    // Publication is pending, and says so.
    let node = support::node(&mut client).await;
    let sink = node.sinks.first().expect("the etcd sink in GetNode");
    assert!(!sink.in_sync && !sink.last_error.is_empty(), "{sink:?}");
    let routes = support::routes(&mut client).await;
    let shown = routes
        .iter()
        .find(|r| r.machine_id == second.id)
        .expect("second's route");
    assert_eq!(shown.pending_sinks, vec!["etcd".to_string()], "{shown:?}");
    // And so do GetMachine (the machine is started, its publication pending) and the
    // metrics.
    let got = support::get_machine(&mut client, &second.id).await;
    assert_eq!(got.state(), pb::MachineState::Started);
    assert_eq!(got.pending_sinks, vec!["etcd".to_string()], "{got:?}");
    let body = support::scrape(&node.metrics_address);
    let pending = "hearth_sink_pending_routes{sink=\"etcd\"}";
    let in_sync = "hearth_sink_in_sync{sink=\"etcd\"}";
    let lag = "hearth_sink_lag_seconds{sink=\"etcd\"}";
    assert_eq!(support::sample(&body, pending), Some(1.0), "{body}");
    assert_eq!(support::sample(&body, in_sync), Some(0.0), "{body}");
    assert!(
        support::sample(&body, lag).is_some_and(|s| s > 0.0),
        "{body}"
    );
    println!("node while etcd is down: {:?}", node.sinks);
    etcd.spawn().await;
    let keys = until(
        &etcd,
        Duration::from_secs(15),
        "etcd in line after the outage",
        |keys| {
            published(keys, &second)
                && !keys
                    .keys()
                    .any(|k| k.contains(&first.id) || k.contains("/first/"))
        },
    )
    .await;
    assert_eq!(
        ours(&keys).len(),
        3,
        "exactly the second machine's keys: {keys:#?}"
    );
    for key in foreign {
        assert!(keys.contains_key(key), "another host's {key} was touched");
    }
    // The next sync reports the sink in line, the route no longer pending.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let node = support::node(&mut client).await;
        if node
            .sinks
            .first()
            .is_some_and(|s| s.in_sync && s.pending == 0)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the sink never reported in sync: {:?}",
            node.sinks
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let routes = support::routes(&mut client).await;
    assert!(
        routes.iter().all(|r| r.pending_sinks.is_empty()),
        "{routes:?}"
    );
    let got = support::get_machine(&mut client, &second.id).await;
    assert!(got.pending_sinks.is_empty(), "{got:?}");
    let body = support::scrape(&support::node(&mut client).await.metrics_address);
    assert_eq!(support::sample(&body, pending), Some(0.0), "{body}");
    assert_eq!(support::sample(&body, in_sync), Some(1.0), "{body}");
    assert_eq!(support::sample(&body, lag), Some(0.0), "{body}");

    // The daemon dies and does not come back: its keys expire with its lease.
    daemon.kill();
    let clock = Instant::now();
    let keys = until(
        &etcd,
        Duration::from_secs(u64::from(TTL) + 2),
        "keys expired with the lease",
        |keys| ours(keys).is_empty(),
    )
    .await;
    println!(
        "keys gone {:.1} s after SIGKILL (TTL {TTL} s)",
        clock.elapsed().as_secs_f64()
    );
    for key in foreign {
        assert!(
            keys.contains_key(key),
            "another host's {key} expired with ours"
        );
    }
}

/// An etcd that serves only HTTPS and requires a client certificate: the sink, given
/// `etcd.tls_ca`, `tls_cert` and `tls_key`, publishes and withdraws through it, while a
/// client without a certificate is turned away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sink_publishes_through_mutual_tls() {
    if support::guest_prereqs::guest_prereqs("etcd_sink (tls)").is_none() {
        return;
    }
    let dir = tempfile::tempdir().expect("pki dir");
    let pki = support::tls::Pki::make(dir.path());
    let Some(etcd) = Etcd::start_tls("etcd_sink (tls)", &pki).await else {
        return;
    };
    assert!(etcd.endpoint().starts_with("https://"));
    let refused = etcd.keys_as("/", false).await;
    assert!(
        refused.is_err(),
        "etcd answered a client without a certificate: {refused:?}"
    );
    let daemon = Daemon::start_with(&etcd.config(HOST, TTL));
    let mut client = daemon.client().await;
    let machine = start(&mut client, "t-1", "sealed").await;
    until(
        &etcd,
        Duration::from_secs(10),
        "published over TLS",
        |keys| published(keys, &machine),
    )
    .await;
    let node = support::node(&mut client).await;
    let sink = node.sinks.first().expect("the etcd sink in GetNode");
    assert!(
        sink.endpoints.iter().all(|e| e.starts_with("https://")),
        "{sink:?}"
    );
    support::destroy(&mut client, &machine.id).await;
    until(
        &etcd,
        Duration::from_secs(2),
        "withdrawn over TLS",
        |keys| ours(keys).is_empty(),
    )
    .await;
    support::assert_audit_clean(&mut client).await;
}
