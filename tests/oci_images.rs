//! Machines from registry images, end to end (root, QEMU, Debian's `docker-registry` on
//! loopback): the tests build their own images (several layers, a whiteout, an opaque
//! directory, a symlink, a hard link, busybox), push them, and create machines from them
//! through hearthd. Skipped loudly when `docker-registry` is missing.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use hearth::api::pb;
use hearth::client::Client;
use support::registry::{
    ConfigSpec, Entry, LayerSpec, Registry, bootable_image, build_image, busybox_layer,
};
use support::{Daemon, destroy, get_machine, pull_error, wait_for};

/// Workload logs reach the disk when the guest halts after a graceful stop, so the
/// stop grace is long: ten TCG guests booting at once slow a stop down a lot.
const GUEST: &str = "[guest]\nstop_grace_secs = 120\n";

fn daemon_for(registry: &Registry) -> Daemon {
    Daemon::start_with(&format!(
        "{GUEST}[images]\ninsecure_registries = [\"{}\"]\n[capacity]\nvcpus = 64\n",
        registry
            .reference("x", "y")
            .split('/')
            .next()
            .unwrap_or_default()
    ))
}

fn request(request_id: &str, name: &str, image: &str) -> pb::CreateMachineRequest {
    pb::CreateMachineRequest {
        request_id: request_id.into(),
        name: name.into(),
        spec: Some(pb::MachineSpec {
            image: image.into(),
            vcpus: 1,
            memory_mib: 128,
            ports: vec![8080],
            ..Default::default()
        }),
        start: None,
    }
}

/// Waits for the machine to start, stops it, and reads what its workload logged.
async fn started_then_stopped_log(client: &mut Client, daemon: &Daemon, id: &str) -> String {
    wait_for(client, id, pb::MachineState::Started).await;
    client
        .machines
        .stop_machine(pb::MachineRef { id: id.into() })
        .await
        .expect("stop");
    wait_for(client, id, pb::MachineState::Stopped).await;
    read_from_disk(daemon, id, "/var/log/hearth-workload.log")
}

/// The error of the machine's first failed `image` step, once there is one.
async fn image_step_failure(client: &mut Client, id: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let got = get_machine(client, id).await;
        if let Some(t) = got
            .timings
            .iter()
            .find(|t| t.step == "image" && t.outcome != "ok")
        {
            return t.outcome.clone();
        }
        assert!(Instant::now() < deadline, "{got:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A file the guest wrote, read with debugfs from the stopped machine's writable disk: the
/// whole root in the `copy` layout, the overlay's upper layer (its `root` directory) in
/// the `overlay` layout.
fn read_from_disk(daemon: &Daemon, id: &str, path: &str) -> String {
    let dir = daemon.layout().machine_dir(id);
    let disk = dir.join("rootfs.ext4");
    let inside = if dir.join("base.ext4").exists() {
        format!("/root{path}")
    } else {
        path.to_string()
    };
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {inside}"))
        .arg(&disk)
        .output()
        .expect("debugfs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_image_boots_and_runs_its_entrypoint_with_its_env_and_user() {
    let Some(registry) = support::registry::start_or_skip("oci_images") else {
        return;
    };
    let image = bootable_image("one");
    registry.push("app", "v1", &image).await;
    let daemon = daemon_for(&registry);
    let mut client = daemon.client().await;
    let reference = registry.reference("app", "v1");
    let m = client
        .machines
        .create_machine(request("oci-1", "oci-one", &reference))
        .await
        .expect("create")
        .into_inner();
    let log = started_then_stopped_log(&mut client, &daemon, &m.id).await;
    assert!(log.contains("seen hello-one as 1000:1000 in /srv"), "{log}");
    assert!(log.contains("motd gone"), "whiteout: {log}");
    assert!(
        log.contains("data new new-hard "),
        "opaque directory: {log}"
    );
    assert!(log.contains("link app"), "symlink: {log}");
    let inodes: Vec<&str> = log
        .split("inodes ")
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(inodes.len(), 2, "{log}");
    assert_eq!(inodes[0], inodes[1], "hard link: {log}");
    destroy(&mut client, &m.id).await;
    let counters = support::node(&mut client).await;
    assert_eq!(
        (counters.image_pulls, counters.image_builds),
        (Some(1), Some(1))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_concurrent_creates_of_an_uncached_image_pull_once_and_build_once() {
    let Some(registry) = support::registry::start_or_skip("oci_images") else {
        return;
    };
    registry.push("burst", "v1", &bootable_image("ten")).await;
    let daemon = daemon_for(&registry);
    let client = daemon.client().await;
    let reference = registry.reference("burst", "v1");
    let mut tasks = Vec::new();
    for i in 0..10 {
        let mut client = client.clone();
        let reference = reference.clone();
        tasks.push(tokio::spawn(async move {
            client
                .machines
                .create_machine(request(&format!("burst-{i}"), &format!("b{i}"), &reference))
                .await
                .expect("create")
                .into_inner()
                .id
        }));
    }
    let mut ids = Vec::new();
    for task in tasks {
        ids.push(task.await.expect("task"));
    }
    // Every machine gets past its image step (booting ten TCG guests is not the point).
    let mut client = client;
    let deadline = Instant::now() + Duration::from_secs(300);
    for id in &ids {
        loop {
            let m = get_machine(&mut client, id).await;
            let imaged = m
                .timings
                .iter()
                .any(|t| t.step == "image" && t.direction == "acquire" && t.outcome == "ok");
            if imaged {
                break;
            }
            assert!(Instant::now() < deadline, "{m:#?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // A create whose image step starts after the build has ended finds the base built
    // by a tag check, without fetching a layer: that is not a second pull.
    let counters = support::node(&mut client).await;
    assert_eq!(counters.image_pulls, Some(1), "{counters:?}");
    assert_eq!(counters.image_builds, Some(1), "{counters:?}");
    assert!(matches!(counters.image_checks, Some(0..=9)), "{counters:?}");
    for id in &ids {
        client
            .machines
            .destroy_machine(pb::MachineRef { id: id.clone() })
            .await
            .expect("destroy");
    }
    for id in &ids {
        wait_for(&mut client, id, pb::MachineState::Destroyed).await;
    }
    support::assert_audit_clean(&mut client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_layer_fails_the_machine_naming_the_entry_and_leaves_nothing() {
    let Some(registry) = support::registry::start_or_skip("oci_images") else {
        return;
    };
    let hostile = build_image(
        &[
            busybox_layer(),
            LayerSpec {
                gzip: true,
                entries: vec![Entry::Symlink("evil".into(), "../../../../etc".into())],
            },
        ],
        &ConfigSpec::running(&["/bin/busybox", "true"]),
    );
    registry.push("hostile", "v1", &hostile).await;
    let daemon = Daemon::start_with(&format!(
        "[images]\ninsecure_registries = [\"{}\"]\n[guest]\nboot_attempts = 1\n",
        registry
            .reference("x", "y")
            .split('/')
            .next()
            .unwrap_or_default()
    ));
    let mut client = daemon.client().await;
    let m = client
        .machines
        .create_machine(request(
            "bad-1",
            "hostile",
            &registry.reference("hostile", "v1"),
        ))
        .await
        .expect("create")
        .into_inner();
    // The image step fails (and is retried) with the entry named in its error.
    let failure = image_step_failure(&mut client, &m.id).await;
    assert!(failure.contains("`evil`"), "{failure}");
    destroy(&mut client, &m.id).await;
    // A retry of the step may still be building when the machine is destroyed: the
    // build belongs to the cache, not the machine. A pull of the same reference joins
    // it (or runs it again) and answers only after its scratch tree is gone.
    let status = pull_error(&mut client, &registry.reference("hostile", "v1")).await;
    assert!(status.message().contains("`evil`"), "{status:?}");
    // No base and no scratch tree is left in the image store.
    let images = daemon.dir.path().join("data/images");
    for sub in ["bases", "tmp"] {
        let left: Vec<_> = std::fs::read_dir(images.join(sub))
            .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{sub}: {left:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oci_layout_directory_boots_like_a_pushed_image() {
    let layout = tempfile::tempdir().expect("tempdir");
    support::registry::write_layout(layout.path(), "v2", &bootable_image("layout"));
    let daemon = Daemon::start_with(GUEST);
    let mut client = daemon.client().await;
    let reference = format!("oci:{}:v2", layout.path().display());
    // A tag the layout does not have fails the image step naming the tags it has.
    let missing = client
        .machines
        .create_machine(request(
            "layout-0",
            "layout-missing",
            &format!("oci:{}:v9", layout.path().display()),
        ))
        .await
        .expect("create")
        .into_inner();
    let m = client
        .machines
        .create_machine(request("layout-1", "layout-one", &reference))
        .await
        .expect("create")
        .into_inner();
    let log = started_then_stopped_log(&mut client, &daemon, &m.id).await;
    assert!(
        log.contains("seen hello-layout as 1000:1000 in /srv"),
        "{log}"
    );
    assert!(log.contains("motd gone"), "whiteout: {log}");
    let failure = image_step_failure(&mut client, &missing.id).await;
    assert!(
        failure.contains("no image `v9`") && failure.contains("v2"),
        "{failure}"
    );
    // Layout images are read in place: the blob directory stays empty.
    let blobs = daemon.dir.path().join("cache/blobs/sha256");
    assert!(
        std::fs::read_dir(&blobs).map_or(true, |mut rd| rd.next().is_none()),
        "blobs copied from a layout"
    );
    destroy(&mut client, &missing.id).await;
    destroy(&mut client, &m.id).await;
    support::assert_audit_clean(&mut client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_over_the_entry_limit_fails_the_machine_at_the_first_attempt() {
    let Some(registry) = support::registry::start_or_skip("oci_images") else {
        return;
    };
    let files = LayerSpec {
        gzip: true,
        entries: (0..12)
            .map(|i| Entry::File(format!("f{i}"), 0o644, vec![b'x']))
            .collect(),
    };
    let image = build_image(&[files], &ConfigSpec::running(&["/bin/true"]));
    registry.push("many", "v1", &image).await;
    let daemon = Daemon::start_with(&format!(
        "[images]\ninsecure_registries = [\"{}\"]\nmax_entries = 10\n",
        registry
            .reference("x", "y")
            .split('/')
            .next()
            .unwrap_or_default()
    ));
    let mut client = daemon.client().await;
    let m = client
        .machines
        .create_machine(request("many-1", "many", &registry.reference("many", "v1")))
        .await
        .expect("create")
        .into_inner();
    // A limit cannot be met by trying again: the machine fails on the first attempt,
    // with the key and the limit in its failure.
    let failed = wait_for(&mut client, &m.id, pb::MachineState::Failed).await;
    assert!(
        failed.failure.contains("images.max_entries") && failed.failure.contains("10"),
        "{failed:#?}"
    );
    let attempts: Vec<_> = failed
        .timings
        .iter()
        .filter(|t| t.step == "image" && t.direction == "acquire")
        .collect();
    assert_eq!(attempts.len(), 1, "{attempts:#?}");
    assert!(
        attempts[0].outcome.contains("images.max_entries"),
        "{attempts:#?}"
    );
    // The image service says the same, as a failed precondition.
    let status = pull_error(&mut client, &registry.reference("many", "v1")).await;
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("images.max_entries"),
        "{status:?}"
    );
    destroy(&mut client, &m.id).await;
}
