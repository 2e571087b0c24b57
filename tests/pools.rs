//! Prepared-capacity pools end to end (root, QEMU): a pool boots its machines ahead of
//! time with idle guests in paused VMMs; creates that match it claim one, each running
//! its own workload with its own environment; a create that finds the pool empty is a
//! cold create counted as a miss; the pool refills; and a daemon killed with a full pool
//! and a claimed machine re-adopts every VMM without restarting one.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use hearth::api::pb;
use hearth::client::Client;
use support::{
    Daemon, all_machines, demo_pool, demo_request, destroy, http_get, wait_for, wait_pool,
};

/// How long a pool may take to boot its machines (TCG guests on 2 cores).
const FILL: Duration = Duration::from_secs(240);

/// A workload that serves a page naming what it was given (its env) and where it runs.
fn serving_env(request_id: &str, who: &str) -> pb::CreateMachineRequest {
    let script = "mkdir -p /srv/www && cd /srv/www && \
        echo \"who=$WHO host=$(/bin/busybox hostname)\" > index.html && \
        exec /bin/busybox httpd -f -p 80 -h /srv/www";
    let mut request = support::shell_request(request_id, who, script);
    if let Some(spec) = request.spec.as_mut() {
        spec.env.insert("WHO".into(), who.into());
    }
    request
}

/// The pid of machine `id`'s VMM as the API reports it.
async fn vmm_pid(client: &mut Client, id: &str) -> u32 {
    support::get_machine(client, id).await.vmm_pid
}

/// Drains the pools (see `support::drain_pools`); then nothing may be left.
async fn drain(daemon: &mut Daemon) {
    let mut client = support::drain_pools(daemon).await;
    support::assert_audit_clean(&mut client).await;
    daemon.assert_no_host_leftovers();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_claims_and_a_miss_each_serve_their_own_env_and_the_pool_refills() {
    let mut daemon = Daemon::start_with(&demo_pool("web", 2));
    let mut client = daemon.client().await;
    let full = wait_pool(&mut client, "web", 2, FILL).await;
    assert_eq!((full.claims, full.misses), (0, 0));
    // Prepared capacity is not listed unless asked for, and its VMMs are paused.
    let listed = client
        .machines
        .list_machines(pb::ListMachinesRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(listed.machines.is_empty(), "{:?}", listed.machines);
    let prepared: Vec<pb::Machine> = all_machines(&mut client).await;
    assert_eq!(prepared.len(), 2);
    assert!(
        prepared
            .iter()
            .all(|m| m.state == pb::MachineState::Prepared as i32 && m.pool == "web" && !m.claimed)
    );

    // Three at once: two claims, one miss (a cold create).
    let mut creates = Vec::new();
    for who in ["alpha", "bravo", "charlie"] {
        let mut client = client.clone();
        creates.push(tokio::spawn(async move {
            client
                .machines
                .create_machine(serving_env(&format!("req-{who}"), who))
                .await
                .expect("create")
                .into_inner()
        }));
    }
    let mut machines = Vec::new();
    for task in creates {
        machines.push(task.await.expect("create task"));
    }
    let claimed: Vec<&pb::Machine> = machines.iter().filter(|m| m.claimed).collect();
    assert_eq!(claimed.len(), 2, "{machines:#?}");
    let prepared_ids: BTreeSet<&str> = prepared.iter().map(|m| m.id.as_str()).collect();
    assert!(claimed.iter().all(|m| prepared_ids.contains(m.id.as_str())));
    for m in &machines {
        let started = wait_for(&mut client, &m.id, pb::MachineState::Started).await;
        let page = http_get(&started.guest_ip, 80);
        assert!(
            page.contains(&format!("who={} host={}", m.name, m.name)),
            "{}: {page}",
            m.name
        );
    }
    // The pool refills behind the claims, and counts them.
    let refilled = wait_pool(&mut client, "web", 2, FILL).await;
    assert_eq!((refilled.claims, refilled.misses), (2, 1), "{refilled:?}");
    assert!(refilled.last_error.is_empty(), "{refilled:?}");
    // A claimed machine is like any other: destroying it does not return it to the pool.
    for m in &machines {
        destroy(&mut client, &m.id).await;
    }
    let after = support::pool_status(&mut client, "web").await;
    assert_eq!(after.ready, 2, "{after:?}");
    drain(&mut daemon).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_daemon_keeps_its_full_pool_and_its_claimed_machine() {
    let mut daemon = Daemon::start_with(&demo_pool("web", 2));
    let mut client = daemon.client().await;
    wait_pool(&mut client, "web", 2, FILL).await;
    let claimed = client
        .machines
        .create_machine(serving_env("req-kept", "kept"))
        .await
        .expect("create")
        .into_inner();
    assert!(claimed.claimed);
    wait_for(&mut client, &claimed.id, pb::MachineState::Started).await;
    wait_pool(&mut client, "web", 2, FILL).await;
    let before: Vec<(String, u32, i32)> = {
        let mut out = Vec::new();
        for m in all_machines(&mut client).await {
            out.push((m.id.clone(), vmm_pid(&mut client, &m.id).await, m.state));
        }
        out.sort();
        out
    };
    assert_eq!(before.len(), 3);
    assert!(before.iter().all(|(_, pid, _)| *pid > 0), "{before:?}");

    daemon.kill();
    daemon.spawn();
    let mut client = daemon.client().await;
    wait_for(&mut client, &claimed.id, pb::MachineState::Started).await;
    let status = wait_pool(&mut client, "web", 2, FILL).await;
    assert_eq!(status.ready, 2);
    let mut after = Vec::new();
    for m in all_machines(&mut client).await {
        after.push((m.id.clone(), vmm_pid(&mut client, &m.id).await, m.state));
    }
    after.sort();
    assert_eq!(
        before, after,
        "the same machines, the same VMM pids, the same states"
    );
    let page = http_get(
        &support::get_machine(&mut client, &claimed.id)
            .await
            .guest_ip,
        80,
    );
    assert!(page.contains("who=kept"), "{page}");

    // A claimed machine stops and starts like any other: its guest boots again, idle,
    // and is given its workload again; it is never the pool's again.
    client
        .machines
        .stop_machine(pb::MachineRef {
            id: claimed.id.clone(),
        })
        .await
        .expect("stop");
    wait_for(&mut client, &claimed.id, pb::MachineState::Stopped).await;
    client
        .machines
        .start_machine(pb::MachineRef {
            id: claimed.id.clone(),
        })
        .await
        .expect("start");
    let again = wait_for(&mut client, &claimed.id, pb::MachineState::Started).await;
    assert!(again.claimed);
    assert!(http_get(&again.guest_ip, 80).contains("who=kept host=kept"));
    destroy(&mut client, &claimed.id).await;

    // A prepared machine whose guest dies is not rebooted but replaced.
    let prepared: Vec<pb::Machine> = all_machines(&mut client)
        .await
        .into_iter()
        .filter(|m| m.state == pb::MachineState::Prepared as i32)
        .collect();
    let victim = &prepared[0];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim.vmm_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill a prepared VMM");
    let gone = support::wait_machine_until(&mut client, &victim.id, FILL, |m| {
        m.state == pb::MachineState::Destroyed as i32
    })
    .await;
    assert!(gone.failure.contains("VMM exited"), "{}", gone.failure);
    let replaced = wait_pool(&mut client, "web", 2, FILL).await;
    assert_eq!(replaced.ready, 2);
    let now_prepared: BTreeSet<String> = all_machines(&mut client)
        .await
        .into_iter()
        .filter(|m| m.state == pb::MachineState::Prepared as i32)
        .map(|m| m.id)
        .collect();
    assert!(!now_prepared.contains(&victim.id), "{now_prepared:?}");

    // A pool that shrinks destroys what it no longer wants.
    daemon.kill();
    daemon.rewrite_config(|text| text.replace("size = 2", "size = 1"));
    daemon.spawn();
    let mut client = daemon.client().await;
    let shrunk = wait_pool(&mut client, "web", 1, FILL).await;
    assert_eq!(shrunk.ready, 1);
    drain(&mut daemon).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_pool_must_exist_match_and_have_a_machine_ready() {
    // A pool of size 0 keeps nothing ready: the named claim is refused, not made cold.
    let daemon = Daemon::start_with(&demo_pool("empty", 0));
    let mut client = daemon.client().await;
    let named = |pool: &str, memory_mib: u32| {
        let mut request = demo_request(&format!("named-{pool}-{memory_mib}"), "named", &[]);
        if let Some(spec) = request.spec.as_mut() {
            spec.pool = pool.into();
            spec.memory_mib = memory_mib;
        }
        request
    };
    let cases = [
        (
            named("empty", 128),
            tonic::Code::FailedPrecondition,
            "spec.pool",
        ),
        (
            named("nope", 128),
            tonic::Code::InvalidArgument,
            "spec.pool",
        ),
        (
            named("empty", 256),
            tonic::Code::InvalidArgument,
            "spec.memory_mib",
        ),
    ];
    for (request, code, field) in cases {
        let err = client
            .machines
            .create_machine(request)
            .await
            .expect_err("refused");
        assert_eq!(err.code(), code, "{err:?}");
        assert!(err.message().contains(field), "{err:?}");
    }
    assert!(all_machines(&mut client).await.is_empty());
    let status = support::pool_status(&mut client, "empty").await;
    assert_eq!((status.claims, status.misses), (0, 1), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_machines_past_their_age_are_recycled() {
    let mut daemon = Daemon::start_with(&format!("{}max_age_secs = 2\n", demo_pool("aging", 1)));
    let mut client = daemon.client().await;
    wait_pool(&mut client, "aging", 1, FILL).await;
    let first = all_machines(&mut client).await;
    assert_eq!(first.len(), 1);
    // Idle for two seconds, it is retired, and another takes its place.
    wait_for(&mut client, &first[0].id, pb::MachineState::Destroyed).await;
    let again = support::wait_pool_until(&mut client, "aging", FILL, |s| s.ready == 1).await;
    assert_eq!(again.ready, 1);
    drain(&mut daemon).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_whose_image_cannot_be_built_reports_it_and_cold_creates_go_on() {
    // Under the test daemons' local root (the temporary directory), and not there.
    let broken = format!(
        "[[pools]]\nname = \"broken\"\nimage = \"oci:{}/nonexistent/hearth-layout\"\nvcpus = 1\nmemory_mib = 128\nsize = 1\n",
        std::env::temp_dir().display()
    );
    let mut daemon = Daemon::start_with(&broken);
    let mut client = daemon.client().await;
    let status =
        support::wait_pool_until(&mut client, "broken", FILL, |s| !s.last_error.is_empty()).await;
    assert!(
        status.last_error.contains("nonexistent/hearth-layout"),
        "{status:?}"
    );
    assert_eq!(status.ready, 0);
    // A cold create of another image is not held up by the broken pool.
    let cold = client
        .machines
        .create_machine(serving_env("req-cold", "cold"))
        .await
        .expect("create")
        .into_inner();
    assert!(!cold.claimed);
    let started = wait_for(&mut client, &cold.id, pb::MachineState::Started).await;
    assert!(http_get(&started.guest_ip, 80).contains("who=cold"));
    destroy(&mut client, &cold.id).await;
    drain(&mut daemon).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_recycles_machines_built_before_its_tag_moved() {
    let Some(registry) = support::registry::start_or_skip("pools tag move") else {
        return;
    };
    let image = registry.reference("app", "live");
    registry
        .push("app", "live", &support::registry::bootable_image("v1"))
        .await;
    let host = image.split('/').next().unwrap_or_default();
    let mut daemon = Daemon::start_with(&format!(
        "[images]\ninsecure_registries = [\"{host}\"]\n[[pools]]\nname = \"app\"\nimage = \"{image}\"\nvcpus = 1\nmemory_mib = 128\nsize = 2\n"
    ));
    let mut client = daemon.client().await;
    wait_pool(&mut client, "app", 2, FILL).await;
    let claim = |request_id: &str| pb::CreateMachineRequest {
        request_id: request_id.into(),
        name: request_id.into(),
        spec: Some(pb::MachineSpec {
            image: image.clone(),
            vcpus: 1,
            memory_mib: 128,
            ports: vec![8080],
            // Serves the image's GREETING, which names the image's version.
            entrypoint: vec!["/bin/busybox".into(), "sh".into(), "-c".into()],
            command: vec![
                "/bin/busybox mkdir -p /www && echo $GREETING > /www/index.html && \
                 exec /bin/busybox httpd -f -p 8080 -h /www"
                    .into(),
            ],
            user: "0:0".into(),
            ..Default::default()
        }),
        start: None,
    };
    // The tag moves; the pool finds out at its next refill (after a claim), and the
    // machine left from the old manifest is retired, not handed out.
    registry
        .push("app", "live", &support::registry::bootable_image("v2"))
        .await;
    let first = client
        .machines
        .create_machine(claim("first"))
        .await
        .expect("claim")
        .into_inner();
    assert!(first.claimed);
    let old: Vec<String> = all_machines(&mut client)
        .await
        .into_iter()
        .filter(|m| m.state == pb::MachineState::Prepared as i32)
        .map(|m| m.id)
        .collect();
    assert_eq!(old.len(), 1);
    let retired = support::wait_machine_until(&mut client, &old[0], FILL, |m| {
        m.state == pb::MachineState::Destroyed as i32
    })
    .await;
    assert!(!retired.claimed);
    wait_pool(&mut client, "app", 2, FILL).await;
    let second = client
        .machines
        .create_machine(claim("second"))
        .await
        .expect("claim")
        .into_inner();
    assert!(second.claimed);
    let started = wait_for(&mut client, &second.id, pb::MachineState::Started).await;
    // Served from the new manifest: its config's env.
    let page = http_get(&started.guest_ip, 8080);
    assert!(page.contains("hello-v2"), "{page}");
    let events = support::events_until(&mut client, &old[0], 0, pb::MachineState::Destroyed).await;
    assert!(
        events.iter().any(|e| e
            .message
            .contains("its image tag now names another manifest")),
        "{events:?}"
    );
    for m in [&first, &second] {
        destroy(&mut client, &m.id).await;
    }
    drain(&mut daemon).await;
}
