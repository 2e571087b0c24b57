//! OCI pulls against a real registry: Debian's `docker-registry` on loopback, fed with
//! images these tests build and push themselves. Covers tag and digest pulls, the config
//! fields, blob reuse, platform choice from an index, the insecure-registry rule, the
//! limits checked on the manifest before any download (each layer's size, the layer
//! count, their sum, free space), the entry limit of the built image, basic auth, and OCI
//! layout directories. Skips loudly when the registry binary is not installed.
//!
//! What Debian's registry cannot play (token auth, a registry sending endless manifest,
//! token and error bodies) is played by `support::fake_registry`, a test double.

mod support;

use std::path::Path;
use std::sync::{Arc, Mutex};

use hearth::image::oci::{
    self, LayoutError, OciRef, Progress, PullError, PulledImage, RegistrySettings,
};
use hearth::image::space::{FreeSpace, SpacePolicy};
use hearth::image::{BaseError, BaseSettings, BaseStore};
use support::fake_registry::{ENDLESS_BYTES, FakeRegistry, Mode};
use support::registry::{
    self, Entry, LayerSpec, TestImage, build_image, sample_config, sample_image, sample_layers,
};

/// Pulls `reference` into `blob_dir`, collecting the progress events.
async fn pull(
    reference: &str,
    settings: &RegistrySettings,
    blob_dir: &Path,
) -> (Result<PulledImage, PullError>, Vec<Progress>) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let reference = OciRef::parse(reference).expect("reference parses");
    let on_progress = move |p: Progress| sink.lock().unwrap().push(p);
    let result = oci::pull(&reference, settings, blob_dir, &on_progress).await;
    let events = events.lock().unwrap().clone();
    (result, events)
}

fn assert_matches_image(pulled: &PulledImage, image: &TestImage, blob_dir: &Path) {
    assert_eq!(pulled.manifest_digest, image.manifest.digest);
    assert_eq!(pulled.config_digest, image.config.digest);
    assert_eq!(pulled.layers.len(), image.layers.len());
    for (layer, blob) in pulled.layers.iter().zip(&image.layers) {
        assert_eq!(layer.digest, blob.digest);
        assert_eq!(layer.media_type, blob.media_type);
        assert_eq!(layer.size, blob.data.len() as u64);
        assert!(layer.path.starts_with(blob_dir), "{}", layer.path.display());
        assert_eq!(
            std::fs::read(&layer.path).unwrap(),
            blob.data,
            "{}",
            layer.digest
        );
    }
    assert_eq!(pulled.config.diff_ids, image.diff_ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_by_tag_then_digest_reuses_every_blob() {
    let Some(reg) = registry::start_or_skip("pull_by_tag_then_digest_reuses_every_blob") else {
        return;
    };
    let image = sample_image("tag-and-digest");
    let digest = reg.push("team/app", "v1", &image).await;
    let blobs = tempfile::tempdir().unwrap();

    // The pull future must be Send: the daemon runs it on a spawned task.
    let (settings, reference, dir) = (
        reg.settings(),
        reg.reference("team/app", "v1"),
        blobs.path().to_path_buf(),
    );
    let (first, events) = tokio::spawn(async move { pull(&reference, &settings, &dir).await })
        .await
        .unwrap();
    let first = first.unwrap_or_else(|e| panic!("{e}\nregistry log:\n{}", reg.log()));
    assert_matches_image(&first, &image, blobs.path());
    assert_eq!(first.index_digest, None);
    assert_eq!(first.stats.blobs_downloaded, 4, "3 layers + config");
    assert_eq!(first.stats.blobs_reused, 0);
    let total: u64 = image
        .layers
        .iter()
        .map(|l| l.data.len() as u64)
        .sum::<u64>()
        + image.config.data.len() as u64;
    assert_eq!(first.stats.bytes_downloaded, total);

    // Config fields come through.
    let c = &first.config;
    assert_eq!(c.entrypoint, ["/bin/app", "--serve"]);
    assert_eq!(c.cmd, ["--port", "8080"]);
    assert_eq!(
        c.env,
        [
            ("PATH".to_string(), "/usr/bin:/bin".to_string()),
            ("GREETING".to_string(), "hello world".to_string())
        ]
    );
    assert_eq!(c.working_dir.as_deref(), Some("/srv"));
    assert_eq!(c.user.as_deref(), Some("1000:1000"));

    // Progress: every layer starts at 0 and ends at its total, never cached.
    for blob in &image.layers {
        let mine: Vec<&Progress> = events.iter().filter(|p| p.digest == blob.digest).collect();
        let size = blob.data.len() as u64;
        assert_eq!(mine.first().map(|p| p.done), Some(0), "{mine:?}");
        assert_eq!(mine.last().map(|p| p.done), Some(size), "{mine:?}");
        assert!(mine.iter().all(|p| p.total == size && !p.cached));
        assert!(mine.windows(2).all(|w| w[0].done <= w[1].done));
    }
    // No temporary files are left behind.
    let names: Vec<String> = std::fs::read_dir(blobs.path().join("sha256"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 4, "{names:?}");
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");

    // The same image by digest: same content, nothing downloaded.
    let by_digest = format!("{}/team/app@{digest}", reg.addr);
    let (second, events) = pull(&by_digest, &reg.settings(), blobs.path()).await;
    let second = second.unwrap();
    assert_matches_image(&second, &image, blobs.path());
    assert_eq!(second.stats.blobs_downloaded, 0);
    assert_eq!(second.stats.bytes_downloaded, 0);
    assert_eq!(second.stats.blobs_reused, 4);
    assert_eq!(events.len(), 3, "{events:?}");
    assert!(events.iter().all(|p| p.cached && p.done == p.total));

    // A corrupted cached layer is noticed and fetched again.
    std::fs::write(&second.layers[1].path, b"garbage").unwrap();
    let (third, _) = pull(
        &reg.reference("team/app", "v1"),
        &reg.settings(),
        blobs.path(),
    )
    .await;
    let third = third.unwrap();
    assert_matches_image(&third, &image, blobs.path());
    assert_eq!(third.stats.blobs_downloaded, 1);
    assert_eq!(third.stats.blobs_reused, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_whose_base_is_built_skips_the_layers() {
    let Some(reg) = registry::start_or_skip("a_manifest_whose_base_is_built_skips_the_layers")
    else {
        return;
    };
    let image = sample_image("skip");
    reg.push("skip", "v1", &image).await;
    let blobs = tempfile::tempdir().unwrap();
    let reference = OciRef::parse(&reg.reference("skip", "v1")).unwrap();
    let asked = Arc::new(Mutex::new(Vec::new()));
    let heard = asked.clone();
    let built = move |manifest: &str| {
        heard.lock().unwrap().push(manifest.to_string());
        true
    };
    let pulled = oci::pull_unless_built(
        &reference,
        &reg.settings(),
        blobs.path(),
        &|p| panic!("no layer progress expected: {p:?}"),
        &built,
    )
    .await
    .unwrap();
    assert_eq!(
        *asked.lock().unwrap(),
        std::slice::from_ref(&image.manifest.digest)
    );
    assert!(!pulled.layers_verified);
    // The config (the workload settings) is read; no layer is fetched.
    assert_eq!(pulled.stats.blobs_downloaded, 1);
    assert_eq!(pulled.config.entrypoint, ["/bin/app", "--serve"]);
    assert_eq!(pulled.layers.len(), 3);
    assert!(pulled.layers.iter().all(|l| !l.path.exists()));
    // Such an image cannot make a base: the one it was skipped for must exist.
    let store = hearth::image::BaseStore::open(
        &blobs.path().join("images"),
        hearth::image::BaseSettings::default(),
    )
    .unwrap();
    let err = store
        .ensure_oci_base("skip", &pulled, 1 << 30, &|_| {})
        .unwrap_err();
    assert!(err.to_string().contains("removed while"), "{err}");
    assert!(store.list().unwrap().is_empty());

    // The same for a layout: the layers are not hashed, so a corrupt one goes unseen.
    let layout = tempfile::tempdir().unwrap();
    registry::write_layout(layout.path(), "v1", &image);
    let hex = image.layers[0].digest.trim_start_matches("sha256:");
    std::fs::write(layout.path().join("blobs/sha256").join(hex), b"corrupt").unwrap();
    let opened = oci::layout::open_unless_built(layout.path(), "v1", &|_| true).unwrap();
    assert!(!opened.layers_verified);
    assert!(matches!(
        oci::layout::open(layout.path(), "v1"),
        Err(LayoutError::BlobCorrupt { .. })
    ));
}

#[tokio::test]
async fn an_index_resolves_to_linux_amd64() {
    let Some(reg) = registry::start_or_skip("an_index_resolves_to_linux_amd64") else {
        return;
    };
    let amd64 = sample_image("amd64");
    let arm64 = build_image(&sample_layers("arm64"), &sample_config("arm64"));
    // arm64 first, so picking the first entry would be wrong.
    let index = reg
        .push_index(
            "multi",
            "v1",
            &[(&arm64, "linux", "arm64"), (&amd64, "linux", "amd64")],
        )
        .await;
    let blobs = tempfile::tempdir().unwrap();
    let (pulled, _) = pull(&reg.reference("multi", "v1"), &reg.settings(), blobs.path()).await;
    let pulled = pulled.unwrap();
    assert_matches_image(&pulled, &amd64, blobs.path());
    assert_eq!(pulled.index_digest.as_deref(), Some(index.as_str()));
    // Only the amd64 blobs were fetched.
    assert_eq!(pulled.stats.blobs_downloaded, 4);

    // The index by digest gives the same image.
    let (again, _) = pull(
        &format!("{}/multi@{index}", reg.addr),
        &reg.settings(),
        blobs.path(),
    )
    .await;
    assert_eq!(again.unwrap().manifest_digest, amd64.manifest.digest);

    // An index without linux/amd64 is refused, listing what it has.
    reg.push_index("armonly", "v1", &[(&arm64, "linux", "arm64")])
        .await;
    let (err, _) = pull(
        &reg.reference("armonly", "v1"),
        &reg.settings(),
        blobs.path(),
    )
    .await;
    let err = err.unwrap_err();
    assert!(matches!(err, PullError::NoPlatform { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("linux/arm64") && message.contains("armonly"),
        "{message}"
    );

    // A single-platform arm64 manifest is refused from its config.
    reg.push("armsingle", "v1", &arm64).await;
    let (err, _) = pull(
        &reg.reference("armsingle", "v1"),
        &reg.settings(),
        blobs.path(),
    )
    .await;
    let err = err.unwrap_err();
    assert!(matches!(err, PullError::WrongPlatform { .. }), "{err}");
}

#[tokio::test]
async fn plain_http_only_for_registries_listed_insecure() {
    let Some(reg) = registry::start_or_skip("plain_http_only_for_registries_listed_insecure")
    else {
        return;
    };
    reg.push("app", "v1", &sample_image("insecure")).await;
    let blobs = tempfile::tempdir().unwrap();
    let settings = RegistrySettings {
        insecure: vec!["127.0.0.1:1".to_string(), "localhost".to_string()],
        ..reg.settings()
    };
    let (err, events) = pull(&reg.reference("app", "v1"), &settings, blobs.path()).await;
    let err = err.unwrap_err();
    match &err {
        PullError::Registry { endpoint, .. } => {
            assert_eq!(endpoint, &format!("https://{}", reg.addr))
        }
        other => panic!("expected a registry error, got {other}"),
    }
    let message = err.to_string();
    assert!(
        message.contains(&format!("https://{}", reg.addr)) && message.contains("`insecure`"),
        "{message}"
    );
    assert!(message.contains(&reg.reference("app", "v1")), "{message}");
    assert!(events.is_empty());
    let stored = std::fs::read_dir(blobs.path().join("sha256"))
        .unwrap()
        .count();
    assert_eq!(stored, 0);
}

#[tokio::test]
async fn a_layer_over_the_limit_is_refused_before_download() {
    let Some(reg) = registry::start_or_skip("a_layer_over_the_limit_is_refused_before_download")
    else {
        return;
    };
    let image = sample_image("limit");
    reg.push("big", "v1", &image).await;
    let largest = image.layers.iter().max_by_key(|l| l.data.len()).unwrap();
    let second = image
        .layers
        .iter()
        .filter(|l| l.digest != largest.digest)
        .map(|l| l.data.len() as u64)
        .max()
        .unwrap();
    let settings = RegistrySettings {
        max_layer_bytes: second,
        ..reg.settings()
    };
    let blobs = tempfile::tempdir().unwrap();
    let (err, events) = pull(&reg.reference("big", "v1"), &settings, blobs.path()).await;
    match err.unwrap_err() {
        PullError::LayerTooLarge {
            digest, size, max, ..
        } => {
            assert_eq!(digest, largest.digest);
            assert_eq!(size, largest.data.len() as u64);
            assert_eq!(max, second);
        }
        other => panic!("expected LayerTooLarge, got {other}"),
    }
    assert!(events.is_empty(), "nothing downloaded: {events:?}");
    let stored = std::fs::read_dir(blobs.path().join("sha256"))
        .unwrap()
        .count();
    assert_eq!(stored, 0);
}

#[tokio::test]
async fn basic_auth_is_sent_only_when_configured() {
    let Some(reg) = registry::start_with_auth_or_skip(
        "basic_auth_is_sent_only_when_configured",
        "ci",
        "s3cret",
    ) else {
        return;
    };
    let image = sample_image("auth");
    reg.push("private", "v1", &image).await;
    let blobs = tempfile::tempdir().unwrap();
    let anonymous = RegistrySettings {
        auth: Vec::new(),
        ..reg.settings()
    };
    let (err, _) = pull(&reg.reference("private", "v1"), &anonymous, blobs.path()).await;
    let message = err.unwrap_err().to_string();
    assert!(
        message.contains("authorized") || message.contains("401"),
        "{message}"
    );

    let wrong = RegistrySettings {
        auth: vec![(reg.addr.clone(), "ci".into(), "wrong".into())],
        ..reg.settings()
    };
    let (err, _) = pull(&reg.reference("private", "v1"), &wrong, blobs.path()).await;
    assert!(err.is_err());

    let (pulled, _) = pull(
        &reg.reference("private", "v1"),
        &reg.settings(),
        blobs.path(),
    )
    .await;
    assert_matches_image(&pulled.unwrap(), &image, blobs.path());
}

#[test]
fn layout_directory_round_trip() {
    let image = sample_image("layout");
    let dir = tempfile::tempdir().unwrap();
    registry::write_layout(dir.path(), "v1", &image);
    let blobs = dir.path().join("blobs");

    let opened = oci::layout::open(dir.path(), "v1").unwrap();
    assert_matches_image(&opened, &image, &blobs);
    assert_eq!(opened.config.entrypoint, ["/bin/app", "--serve"]);
    assert_eq!(opened.config.user.as_deref(), Some("1000:1000"));
    assert_eq!(opened.stats.blobs_downloaded, 0);

    let by_digest = oci::layout::open(dir.path(), &image.manifest.digest).unwrap();
    assert_eq!(by_digest, opened);

    let err = oci::layout::open(dir.path(), "v2").unwrap_err();
    assert!(matches!(err, LayoutError::NotFound { .. }), "{err}");
    assert!(err.to_string().contains("tags: v1"), "{err}");

    let err = oci::layout::open(dir.path().join("blobs").as_path(), "v1").unwrap_err();
    assert!(matches!(err, LayoutError::NotALayout { .. }), "{err}");

    // A corrupted layer is caught by its digest, naming the file.
    let victim = &opened.layers[2].path;
    let mut data = std::fs::read(victim).unwrap();
    let last = data.len() - 1;
    data[last] ^= 0xff;
    std::fs::write(victim, data).unwrap();
    let err = oci::layout::open(dir.path(), "v1").unwrap_err();
    assert!(matches!(err, LayoutError::BlobCorrupt { .. }), "{err}");
    assert!(
        err.to_string().contains(&victim.display().to_string()),
        "{err}"
    );

    std::fs::remove_file(victim).unwrap();
    let err = oci::layout::open(dir.path(), "v1").unwrap_err();
    assert!(matches!(err, LayoutError::BlobMissing { .. }), "{err}");
}

/// Pushes `image` as `<repo>:v1`, then deletes every blob it has from the registry, so
/// that only its manifest can be fetched: a pull refused for what the manifest says
/// proves, by failing any other way, that nothing was downloaded first. Returns the
/// reference.
async fn push_manifest_only(reg: &registry::Registry, repo: &str, image: &TestImage) -> String {
    reg.push(repo, "v1", image).await;
    for blob in image.layers.iter().chain(std::iter::once(&image.config)) {
        assert_eq!(
            reg.delete_blob(repo, &blob.digest),
            Some(202),
            "delete {}: {}",
            blob.digest,
            reg.log()
        );
    }
    let reference = reg.reference(repo, "v1");
    // With nothing refused on the manifest, the pull must fail on a missing blob.
    let blobs = tempfile::tempdir().unwrap();
    let (result, _) = pull(&reference, &reg.settings(), blobs.path()).await;
    let err = result.expect_err("the blobs are gone");
    assert!(
        matches!(err, PullError::Registry { .. }) && !err.is_over_limit(),
        "{err}"
    );
    reference
}

fn assert_nothing_downloaded(events: &[Progress], blob_dir: &Path) {
    assert!(events.is_empty(), "nothing downloaded: {events:?}");
    let stored = std::fs::read_dir(blob_dir.join("sha256"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(stored, 0);
}

#[tokio::test]
async fn a_manifest_with_too_many_layers_is_refused_before_any_download() {
    let Some(reg) =
        registry::start_or_skip("a_manifest_with_too_many_layers_is_refused_before_any_download")
    else {
        return;
    };
    let image = sample_image("many-layers");
    let layers = image.layers.len() as u64;
    assert!(layers >= 2);
    let reference = push_manifest_only(&reg, "layers", &image).await;
    let settings = RegistrySettings {
        max_layers: layers - 1,
        ..reg.settings()
    };
    let blobs = tempfile::tempdir().unwrap();
    let (result, events) = pull(&reference, &settings, blobs.path()).await;
    let err = result.unwrap_err();
    match &err {
        PullError::TooManyLayers {
            manifest,
            layers: got,
            max,
            ..
        } => {
            assert_eq!(manifest, &image.manifest.digest);
            assert_eq!((*got, *max), (layers, layers - 1));
        }
        other => panic!("expected TooManyLayers, got {other}"),
    }
    assert!(err.is_over_limit() && !err.is_unreachable() && !err.is_missing());
    assert!(err.to_string().contains("images.max_layers"), "{err}");
    assert_nothing_downloaded(&events, blobs.path());
}

#[tokio::test]
async fn a_manifest_over_the_image_size_is_refused_before_any_download() {
    let Some(reg) =
        registry::start_or_skip("a_manifest_over_the_image_size_is_refused_before_any_download")
    else {
        return;
    };
    let image = sample_image("image-size");
    let total: u64 = image.layers.iter().map(|l| l.data.len() as u64).sum();
    let reference = push_manifest_only(&reg, "sized", &image).await;
    let settings = RegistrySettings {
        max_image_bytes: total - 1,
        ..reg.settings()
    };
    let blobs = tempfile::tempdir().unwrap();
    let (result, events) = pull(&reference, &settings, blobs.path()).await;
    let err = result.unwrap_err();
    match &err {
        PullError::ImageTooLarge {
            total: got, max, ..
        } => assert_eq!((*got, *max), (total, total - 1)),
        other => panic!("expected ImageTooLarge, got {other}"),
    }
    assert!(err.is_over_limit());
    assert!(err.to_string().contains("images.max_image_mib"), "{err}");
    assert_nothing_downloaded(&events, blobs.path());
}

#[tokio::test]
async fn too_little_free_space_refuses_a_pull_before_any_download() {
    let Some(reg) =
        registry::start_or_skip("too_little_free_space_refuses_a_pull_before_any_download")
    else {
        return;
    };
    let image = sample_image("space");
    let needed: u64 = image
        .layers
        .iter()
        .chain(std::iter::once(&image.config))
        .map(|b| b.data.len() as u64)
        .sum();
    reg.push("space", "v1", &image).await;
    let reference = reg.reference("space", "v1");
    let blobs = tempfile::tempdir().unwrap();
    let with_free = |free: u64, reserve: u64| RegistrySettings {
        space: SpacePolicy {
            reserve_bytes: reserve,
            free: FreeSpace::Fixed(free),
        },
        ..reg.settings()
    };
    // One byte short of the blobs plus the reserve.
    let (result, events) = pull(&reference, &with_free(needed + 99, 100), blobs.path()).await;
    let err = result.unwrap_err();
    match &err {
        PullError::NoSpace { source, .. } => {
            let message = source.to_string();
            assert!(message.contains("images.min_free_mib"), "{message}");
        }
        other => panic!("expected NoSpace, got {other}"),
    }
    assert!(err.is_no_space() && !err.is_over_limit());
    assert_nothing_downloaded(&events, blobs.path());
    // Exactly enough is enough.
    let (result, _) = pull(&reference, &with_free(needed + 100, 100), blobs.path()).await;
    assert_matches_image(&result.unwrap(), &image, blobs.path());
    // Blobs already in the cache need no space: nothing is left to download.
    let (result, events) = pull(&reference, &with_free(100, 100), blobs.path()).await;
    assert_matches_image(&result.unwrap(), &image, blobs.path());
    assert!(events.iter().all(|e| e.cached), "{events:?}");
}

#[tokio::test]
async fn an_image_over_the_entry_limit_fails_its_build_naming_the_key() {
    let Some(reg) =
        registry::start_or_skip("an_image_over_the_entry_limit_fails_its_build_naming_the_key")
    else {
        return;
    };
    // 3 directories + 40 files over two layers.
    let files = |dir: &str| LayerSpec {
        gzip: true,
        entries: std::iter::once(Entry::Dir(dir.into()))
            .chain((0..20).map(|i| Entry::File(format!("{dir}/f{i}"), 0o644, vec![b'x'; i])))
            .collect(),
    };
    let image = build_image(
        &[
            files("a"),
            files("b"),
            LayerSpec {
                gzip: false,
                entries: vec![Entry::Dir("c".into())],
            },
        ],
        &sample_config("amd64"),
    );
    reg.push("entries", "v1", &image).await;
    let blobs = tempfile::tempdir().unwrap();
    let (pulled, _) = pull(
        &reg.reference("entries", "v1"),
        &reg.settings(),
        blobs.path(),
    )
    .await;
    let pulled = pulled.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bases = |max_entries: u64| {
        BaseStore::open(
            &dir.path().join("images"),
            BaseSettings {
                max_entries,
                ..BaseSettings::default()
            },
        )
        .unwrap()
    };
    let err = bases(30)
        .ensure_oci_base("entries:v1", &pulled, 1 << 30, &|_| {})
        .unwrap_err();
    assert!(err.is_over_limit(), "{err}");
    assert!(matches!(err, BaseError::OverLimit { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("images.max_entries") && message.contains("30"),
        "{message}"
    );
    // Nothing of the failed build is left.
    let left = std::fs::read_dir(dir.path().join("images/tmp"))
        .unwrap()
        .count();
    assert_eq!(left, 0);
    // At its exact size the image builds.
    let (base, made) = bases(43)
        .ensure_oci_base("entries:v1", &pulled, 1 << 30, &|_| {})
        .unwrap();
    assert!(made && base.path.is_file());
}

/// Settings that reach the double over plain HTTP, with `auth` for it if given.
fn fake_settings(fake: &FakeRegistry, auth: Option<(&str, &str)>) -> RegistrySettings {
    RegistrySettings {
        insecure: vec![fake.addr.clone()],
        auth: auth
            .map(|(u, p)| vec![(fake.addr.clone(), u.to_string(), p.to_string())])
            .unwrap_or_default(),
        ..RegistrySettings::default()
    }
}

/// Pulls `app:v1` from the double without credentials; the error it must end with.
async fn pull_from(fake: &FakeRegistry, blob_dir: &Path) -> PullError {
    let (result, _) = pull(
        &fake.reference("app", "v1"),
        &fake_settings(fake, None),
        blob_dir,
    )
    .await;
    match result {
        Ok(_) => panic!("the pull from the hostile registry succeeded"),
        Err(e) => e,
    }
}

#[tokio::test]
async fn a_token_registry_is_pulled_from_with_the_credentials_sent_to_its_realm() {
    let image = Arc::new(sample_image("tokened"));
    let fake = FakeRegistry::start(Mode::Tokened {
        image: image.clone(),
        credentials: Some(("ci".into(), "s3cret".into())),
        token: "tok-123.abc".into(),
    })
    .await;
    let blobs = tempfile::tempdir().unwrap();
    let reference = fake.reference("team/app", "v1");

    // Without credentials the realm refuses, and the error says where it failed.
    let (err, events) = pull(&reference, &fake_settings(&fake, None), blobs.path()).await;
    let message = err.unwrap_err().to_string();
    assert!(
        message.contains("token from http://") && message.contains("401"),
        "{message}"
    );
    assert!(events.is_empty());

    let settings = fake_settings(&fake, Some(("ci", "s3cret")));
    let (pulled, _) = pull(&reference, &settings, blobs.path()).await;
    assert_matches_image(&pulled.unwrap(), &image, blobs.path());
    let saw = fake.realm_saw.lock().unwrap().clone();
    assert_eq!(saw.first().map(String::as_str), Some(""), "{saw:?}");
    assert_eq!(
        saw.last().map(String::as_str),
        Some("Basic Y2k6czNjcmV0"),
        "{saw:?}"
    );
    // The token is kept for the repository: a second pull asks the realm no more.
    let asked = saw.len();
    let again = tempfile::tempdir().unwrap();
    let (pulled, _) = pull(&reference, &settings, again.path()).await;
    assert_matches_image(&pulled.unwrap(), &image, again.path());
    assert_eq!(fake.realm_saw.lock().unwrap().len(), asked);
}

#[tokio::test]
async fn endless_manifest_token_and_error_bodies_are_refused_at_their_caps() {
    let blobs = tempfile::tempdir().unwrap();
    // The client stops at its cap; what the double got into socket buffers before the
    // connection closed is all that is sent beyond it.
    let stopped_early = |fake: &FakeRegistry| {
        let sent = fake.sent();
        assert!(sent < 64 << 20, "{sent} of {ENDLESS_BYTES} bytes were sent");
    };

    for declare in [false, true] {
        let fake = FakeRegistry::start(Mode::EndlessManifest { declare }).await;
        let err = pull_from(&fake, blobs.path()).await;
        let message = err.to_string();
        assert!(err.is_over_limit(), "{message}");
        assert!(
            message.contains(&format!(
                "manifest {}over the limit of {} bytes",
                if declare {
                    format!("of {ENDLESS_BYTES} bytes, ")
                } else {
                    String::new()
                },
                oci::MAX_MANIFEST_BYTES
            )),
            "{message}"
        );
        stopped_early(&fake);
    }

    let fake = FakeRegistry::start(Mode::EndlessToken).await;
    let message = pull_from(&fake, blobs.path()).await.to_string();
    assert!(
        message.contains(&format!(
            "token response over the limit of {} bytes",
            oci::MAX_TOKEN_BYTES
        )),
        "{message}"
    );
    stopped_early(&fake);

    let fake = FakeRegistry::start(Mode::EndlessError).await;
    let err = pull_from(&fake, blobs.path()).await;
    let message = err.to_string();
    assert!(err.is_missing(), "{message}");
    assert!(message.contains("HTTP 404"), "{message}");
    assert!(message.len() < 1024, "{} bytes: {message}", message.len());
    stopped_early(&fake);
}
