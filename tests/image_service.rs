//! The image cache through the API and the CLI (root, Debian's `docker-registry` on
//! loopback, QEMU for the machine that holds a base): a pull streams its progress and
//! ends with the image; the inventory survives a restart; a base a machine uses cannot
//! be removed; removal and collection by budget take the blobs only they needed.
//! Skipped loudly when `docker-registry` is missing.

mod support;

use std::path::Path;
use std::process::Command;

use hearth::api::pb::{self, pull_image_progress::Event};
use hearth::client::Client;
use support::fake_registry::{ENDLESS_BYTES, FakeRegistry, Mode};
use support::registry::{ConfigSpec, Entry, LayerSpec, Registry, build_image, sample_image};
use support::{Daemon, demo_request, destroy, pull_error, wait_for};

fn registry_host(registry: &Registry) -> String {
    registry
        .reference("x", "y")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string()
}

/// A daemon that collects only when asked, with `extra` under `[images]`.
fn daemon_for(registry: &Registry, extra: &str) -> Daemon {
    Daemon::start_with(&format!(
        "[images]\ninsecure_registries = [\"{}\"]\ncollect_interval_secs = 0\n{extra}\n",
        registry_host(registry)
    ))
}

async fn pull(client: &mut Client, image: &str) -> (Vec<Event>, pb::Image) {
    let mut stream = client
        .images
        .pull_image(pb::PullImageRequest {
            image: image.into(),
        })
        .await
        .expect("pull")
        .into_inner();
    let mut events = Vec::new();
    while let Some(progress) = stream.message().await.expect("pull stream") {
        events.extend(progress.event);
    }
    let Some(Event::Image(image)) = events.pop() else {
        panic!("the pull did not end with an image: {events:?}");
    };
    (events, image)
}

async fn list(client: &mut Client) -> Vec<pb::Image> {
    client
        .images
        .list_images(pb::ListImagesRequest {})
        .await
        .expect("list")
        .into_inner()
        .images
}

async fn prune(client: &mut Client) -> pb::PruneImagesResponse {
    client
        .images
        .prune_images(pb::PruneImagesRequest {})
        .await
        .expect("prune")
        .into_inner()
}

fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn blobs_of(daemon: &Daemon) -> Vec<String> {
    files_in(&daemon.dir.path().join("cache/blobs/sha256"))
}

fn bases_of(daemon: &Daemon) -> Vec<String> {
    files_in(&daemon.dir.path().join("data/images/bases"))
        .into_iter()
        .filter(|f| f.ends_with(".ext4"))
        .collect()
}

/// Runs the `hearth` CLI against the daemon.
fn cli(daemon: &Daemon, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_hearth"))
        .arg("--socket")
        .arg(daemon.dir.path().join("api.sock"))
        .args(args)
        .output()
        .expect("run hearth")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_streams_progress_and_the_image_is_listed_across_a_restart_then_removed() {
    let Some(registry) = support::registry::start_or_skip("image_service") else {
        return;
    };
    let image = sample_image("svc");
    registry.push("svc", "v1", &image).await;
    let reference = registry.reference("svc", "v1");
    let mut daemon = daemon_for(&registry, "");
    let mut client = daemon.client().await;

    let (events, pulled) = pull(&mut client, &reference).await;
    let phases: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            Event::Phase(p) => Some(p.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(phases.first(), Some(&"resolving"), "{phases:?}");
    assert!(
        phases.contains(&"unpacking layer 1/3") && phases.last() == Some(&"building ext4"),
        "{phases:?}"
    );
    for layer in &image.layers {
        let seen: Vec<&pb::LayerProgress> = events
            .iter()
            .filter_map(|e| match e {
                Event::Layer(l) if l.digest == layer.digest => Some(l),
                _ => None,
            })
            .collect();
        let last = seen.last().expect("progress for every layer");
        assert_eq!(last.done_bytes, layer.data.len() as u64);
        assert_eq!(last.total_bytes, layer.data.len() as u64);
        assert!(!last.cached);
    }
    assert_eq!(pulled.names, std::slice::from_ref(&reference));
    assert_eq!(pulled.manifest_digest, image.manifest.digest);
    assert_eq!(pulled.blobs as usize, image.layers.len() + 1);
    assert!(pulled.machines.is_empty());
    assert_eq!(blobs_of(&daemon).len(), image.layers.len() + 1);

    // Again: the manifest is resolved, and as its base is built no layer is touched.
    let (events, again) = pull(&mut client, &reference).await;
    assert_eq!(again.digest, pulled.digest);
    assert!(
        events.iter().all(|e| !matches!(e, Event::Layer(_))),
        "{events:?}"
    );
    assert!(
        events.contains(&Event::Phase("base already built".into())),
        "{events:?}"
    );
    let node = support::node(&mut client).await;
    assert_eq!(
        (node.image_pulls, node.image_checks, node.image_builds),
        (Some(1), Some(1), Some(1))
    );

    // The inventory is durable: a killed daemon's successor lists the same image.
    daemon.kill();
    daemon.spawn();
    let mut client = daemon.client().await;
    let listed = list(&mut client).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].digest, pulled.digest);
    assert_eq!(listed[0].names, std::slice::from_ref(&reference));
    assert!(listed[0].last_used_unix >= pulled.built_unix);

    // The CLI sees it too.
    let out = cli(&daemon, &["--json", "image", "list"]);
    assert!(out.status.success(), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json[0]["digest"], pulled.digest.as_str());

    // A registry outage does not stop the use of an image built before; an image never
    // pulled fails, naming it.
    let never_pulled = registry.reference("svc", "v2");
    drop(registry);
    let (events, offline) = pull(&mut client, &reference).await;
    assert_eq!(offline.digest, pulled.digest);
    assert!(
        events.contains(&Event::Phase(
            "registry unreachable; using the base built before".into()
        )),
        "{events:?}"
    );
    let err = pull_error(&mut client, &never_pulled).await;
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains(&never_pulled), "{}", err.message());

    // Removed by name, with its blobs; a second removal names what is missing.
    let removed = client
        .images
        .remove_image(pb::RemoveImageRequest {
            image: reference.clone(),
        })
        .await
        .expect("remove")
        .into_inner()
        .removed;
    assert_eq!(removed.len(), 1);
    assert!(list(&mut client).await.is_empty());
    assert!(blobs_of(&daemon).is_empty(), "{:?}", blobs_of(&daemon));
    assert!(bases_of(&daemon).is_empty(), "{:?}", bases_of(&daemon));
    let err = client
        .images
        .remove_image(pb::RemoveImageRequest {
            image: reference.clone(),
        })
        .await
        .expect_err("already removed");
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(err.message().contains(&reference), "{}", err.message());

    // Bad input names the field.
    let err = client
        .images
        .pull_image(pb::PullImageRequest {
            image: "oci:relative/dir".into(),
        })
        .await
        .expect_err("relative layout");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().starts_with("image: "), "{}", err.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_base_in_use_stays_and_a_prune_over_budget_takes_the_rest_with_their_blobs() {
    let Some(registry) = support::registry::start_or_skip("image_service") else {
        return;
    };
    let (one, two) = (sample_image("one"), sample_image("two"));
    registry.push("one", "v1", &one).await;
    registry.push("two", "v1", &two).await;
    // A 1 MiB budget and no grace: everything unreferenced is over it.
    let daemon = daemon_for(
        &registry,
        "cache_budget_mib = 1\ncollect_grace_secs = 0\nmax_unused_hours = 0",
    );
    let mut client = daemon.client().await;

    // One through the CLI (its JSON lines end with the image), one through the API.
    let out = cli(
        &daemon,
        &["--json", "image", "pull", &registry.reference("one", "v1")],
    );
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("a line")).expect("json");
    assert_eq!(
        last["image"]["names"][0],
        registry.reference("one", "v1").as_str()
    );
    pull(&mut client, &registry.reference("two", "v1")).await;
    // The sample images share their first two layers: 2 shared + 2 x (layer + config).
    assert_eq!(blobs_of(&daemon).len(), 6);
    // Removing one image keeps the layers the other still needs.
    let removed = client
        .images
        .remove_image(pb::RemoveImageRequest {
            image: registry.reference("one", "v1"),
        })
        .await
        .expect("remove one")
        .into_inner()
        .removed;
    assert_eq!(removed.len(), 1);
    assert_eq!(blobs_of(&daemon).len(), 4);
    pull(&mut client, &registry.reference("one", "v1")).await;
    assert_eq!(blobs_of(&daemon).len(), 6);

    // A machine on the demo image holds the demo base.
    let m = client
        .machines
        .create_machine(demo_request("hold-1", "holder", &[]))
        .await
        .expect("create")
        .into_inner();
    wait_for(&mut client, &m.id, pb::MachineState::Started).await;
    let err = client
        .images
        .remove_image(pb::RemoveImageRequest {
            image: "demo".into(),
        })
        .await
        .expect_err("in use");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("holder"), "{}", err.message());

    let pruned = prune(&mut client).await;
    let mut names: Vec<&str> = pruned.removed.iter().map(|i| i.names[0].as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            registry.reference("one", "v1"),
            registry.reference("two", "v1")
        ]
    );
    assert!(pruned.reasons.iter().all(|r| r == "over budget"));
    assert_eq!(pruned.blobs_removed, 6);
    assert!(pruned.bytes_freed > 0);
    assert!(blobs_of(&daemon).is_empty());
    let left = list(&mut client).await;
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].names, ["demo"]);
    assert_eq!(left[0].machines, ["holder"]);
    assert!(left[0].disk_bytes > 1 << 20, "{left:?}");

    // Once the machine is gone, its base goes too.
    destroy(&mut client, &m.id).await;
    let pruned = prune(&mut client).await;
    assert_eq!(pruned.removed.len(), 1);
    assert_eq!(pruned.still_over_bytes, 0);
    assert!(list(&mut client).await.is_empty());
    assert!(bases_of(&daemon).is_empty());
    support::assert_audit_clean(&mut client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_layers_are_refused_naming_the_entry_and_leave_nothing() {
    let config = ConfigSpec::running(&["/bin/true"]);
    let layer = |gzip: bool, entries: Vec<Entry>| LayerSpec { gzip, entries };
    let cases = [
        (
            "traversal",
            layer(
                false,
                vec![Entry::RawName("../escape".into(), b"x".to_vec())],
            ),
            "../escape",
        ),
        (
            "symlink",
            layer(
                true,
                vec![Entry::Symlink("evil".into(), "../../../../etc".into())],
            ),
            "`evil`",
        ),
        (
            // 8 MiB of zeros gzip to a few KiB; the daemon allows 1 MiB unpacked.
            "bomb",
            layer(
                true,
                vec![
                    Entry::Dir("usr".into()),
                    Entry::File("usr/bomb".into(), 0o644, vec![0; 8 << 20]),
                ],
            ),
            "usr/bomb",
        ),
    ];
    let layouts = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start_with("[images]\nmax_image_mib = 1\ncollect_interval_secs = 0\n");
    let mut client = daemon.client().await;
    for (tag, hostile, entry) in cases {
        let dir = layouts.path().join(tag);
        let innocent = layer(true, vec![Entry::Dir("etc".into())]);
        support::registry::write_layout(&dir, tag, &build_image(&[innocent, hostile], &config));
        let reference = format!("oci:{}:{tag}", dir.display());
        let err = pull_error(&mut client, &reference).await;
        assert_eq!(
            err.code(),
            tonic::Code::FailedPrecondition,
            "{tag}: {err:?}"
        );
        assert!(err.message().contains(entry), "{tag}: {}", err.message());
    }
    // Nothing built, nothing left half-made.
    assert!(list(&mut client).await.is_empty());
    let images = daemon.dir.path().join("data/images");
    for sub in ["bases", "tmp"] {
        let left = files_in(&images.join(sub));
        assert!(left.is_empty(), "{sub}: {left:?}");
    }
}

/// A registry that sends endless bodies (a test double: Debian's registry sends only
/// honest ones) gets each pull refused at the body's cap, and the daemon's peak memory
/// stays near where it was: the bodies are never held whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_registry_bodies_are_refused_with_the_daemons_memory_bounded() {
    let manifest = FakeRegistry::start(Mode::EndlessManifest { declare: false }).await;
    let token = FakeRegistry::start(Mode::EndlessToken).await;
    let error = FakeRegistry::start(Mode::EndlessError).await;
    let daemon = Daemon::start_with(&format!(
        "[images]\ninsecure_registries = [\"{}\", \"{}\", \"{}\"]\n",
        manifest.addr, token.addr, error.addr
    ));
    let mut client = daemon.client().await;
    // The first pull sets up what every pull shares (the HTTP client, TLS); an endless
    // error body is a not-found with a bounded message.
    let status = pull_error(&mut client, &error.reference("app", "v1")).await;
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    assert!(status.message().len() < 1024, "{}", status.message());
    let before = daemon.peak_rss_kib().expect("VmHWM");

    let status = pull_error(&mut client, &manifest.reference("app", "v1")).await;
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains(&format!(
            "manifest over the limit of {} bytes",
            hearth::image::oci::MAX_MANIFEST_BYTES
        )),
        "{}",
        status.message()
    );
    let status = pull_error(&mut client, &token.reference("app", "v1")).await;
    assert!(
        status.message().contains(&format!(
            "token response over the limit of {} bytes",
            hearth::image::oci::MAX_TOKEN_BYTES
        )),
        "{}",
        status.message()
    );

    let after = daemon.peak_rss_kib().expect("VmHWM");
    let grown_mib = after.saturating_sub(before) as f64 / 1024.0;
    println!(
        "endless registry bodies: daemon peak RSS {before} KiB -> {after} KiB (+{grown_mib:.1} MiB); \
         sent {} + {} bytes of {ENDLESS_BYTES} each",
        manifest.sent(),
        token.sent()
    );
    assert!(grown_mib < 48.0, "peak RSS grew {grown_mib:.1} MiB");
    for fake in [&manifest, &token, &error] {
        assert!(fake.sent() < 64 << 20, "{} bytes sent", fake.sent());
    }
    // The daemon still answers, and the machine cache is unharmed.
    assert!(list(&mut client).await.is_empty());
}
