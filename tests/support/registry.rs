//! Test support for OCI images: Debian's `docker-registry` (the CNCF distribution
//! registry) on a free loopback port with its storage in a temporary directory, killed
//! on drop; and test images built here (tar layers, a config, a manifest), pushed with
//! oci-client or written as an OCI layout directory.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flate2::Compression;
use flate2::write::GzEncoder;
use hearth::image::oci::RegistrySettings;
use hyper::header::HeaderValue;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde_json::json;
use sha2::{Digest, Sha256};

/// Debian's registry binary (package `docker-registry`).
pub const REGISTRY_BINARY: &str = "/usr/bin/docker-registry";

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// A registry process on `127.0.0.1:<port>`; killed and its storage removed on drop.
pub struct Registry {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// `127.0.0.1:<port>`, the registry part of references to it.
    pub addr: String,
    /// The basic-auth user and password it requires, if started with auth.
    pub credentials: Option<(String, String)>,
}

/// Starts a registry, or prints a loud skip line and returns `None` when the binary is
/// not installed.
pub fn start_or_skip(test: &str) -> Option<Registry> {
    if !Path::new(REGISTRY_BINARY).is_file() {
        super::skipped(
            test,
            &format!("{REGISTRY_BINARY} is missing (apt-get install docker-registry)"),
        );
        return None;
    }
    Some(Registry::start(None))
}

/// Like [`start_or_skip`], with basic auth required for every request.
pub fn start_with_auth_or_skip(test: &str, user: &str, password: &str) -> Option<Registry> {
    if !Path::new(REGISTRY_BINARY).is_file() {
        super::skipped(
            test,
            &format!("{REGISTRY_BINARY} is missing (apt-get install docker-registry)"),
        );
        return None;
    }
    Some(Registry::start(Some((
        user.to_string(),
        password.to_string(),
    ))))
}

impl Registry {
    /// Starts the registry and waits until `GET /v2/` answers. Panics (after killing it)
    /// if it does not come up.
    pub fn start(credentials: Option<(String, String)>) -> Registry {
        let mut dir = tempfile::tempdir().expect("registry temp dir");
        let mut last_log = String::new();
        // A port chosen free can be taken before the registry binds it: retry a few times.
        for _ in 0..3 {
            let port = free_port();
            let config = dir.path().join("config.yml");
            std::fs::write(
                &config,
                registry_config(dir.path(), port, credentials.is_some()),
            )
            .expect("write registry config");
            if let Some((user, password)) = &credentials {
                let hash = bcrypt::hash_with_result(password, 4)
                    .expect("bcrypt")
                    .format_for_version(bcrypt::Version::TwoY);
                std::fs::write(dir.path().join("htpasswd"), format!("{user}:{hash}\n"))
                    .expect("write htpasswd");
            }
            let log = std::fs::File::create(dir.path().join("registry.log")).expect("log");
            let child = Command::new(REGISTRY_BINARY)
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("spawn docker-registry");
            let mut registry = Registry {
                child: Some(child),
                dir,
                addr: format!("127.0.0.1:{port}"),
                credentials: credentials.clone(),
            };
            if registry.wait_ready(Duration::from_secs(20)) {
                return registry;
            }
            last_log = registry.log();
            registry.kill();
            dir = registry.take_dir();
        }
        panic!("docker-registry did not come up; its log:\n{last_log}");
    }

    /// Polls `GET /v2/` until it answers 200 (or 401 with auth), the process exits, or
    /// the deadline passes.
    fn wait_ready(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(_)) = child.try_wait()
            {
                return false;
            }
            if let Some(status) = http_status(&self.addr, "/v2/")
                && (status == 200 || status == 401)
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn take_dir(mut self) -> tempfile::TempDir {
        self.kill();
        std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir"))
    }

    /// The registry's log so far, for assertion messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Settings that reach this registry: listed as insecure (it serves plain HTTP),
    /// with its credentials, and a generous layer limit.
    pub fn settings(&self) -> RegistrySettings {
        RegistrySettings {
            insecure: vec![self.addr.clone()],
            auth: self
                .credentials
                .iter()
                .map(|(u, p)| (self.addr.clone(), u.clone(), p.clone()))
                .collect(),
            max_layer_bytes: 1 << 30,
            ..RegistrySettings::default()
        }
    }

    /// Deletes blob `digest` from `repo` (the registry is started with deletes enabled);
    /// the HTTP status. A pull that then asks for the blob fails, which is how tests
    /// prove that a refusal came before any download.
    pub fn delete_blob(&self, repo: &str, digest: &str) -> Option<u16> {
        request_status(&self.addr, "DELETE", &format!("/v2/{repo}/blobs/{digest}"))
    }

    /// `127.0.0.1:<port>/<repo>:<tag>`.
    pub fn reference(&self, repo: &str, tag: &str) -> String {
        format!("{}/{repo}:{tag}", self.addr)
    }

    /// A push client for this registry (plain HTTP), with its credentials stored.
    async fn client(&self) -> (Client, RegistryAuth) {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = Client::try_from(ClientConfig {
            protocol: ClientProtocol::Http,
            ..ClientConfig::default()
        })
        .expect("oci client");
        let auth = match &self.credentials {
            Some((u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
            None => RegistryAuth::Anonymous,
        };
        client.store_auth_if_needed(&self.addr, &auth).await;
        (client, auth)
    }

    /// Pushes `image` (its blobs, then its manifest) as `<repo>:<tag>`; returns the
    /// manifest digest.
    pub async fn push(&self, repo: &str, tag: &str, image: &TestImage) -> String {
        let (client, _) = self.client().await;
        let reference = Reference::with_tag(self.addr.clone(), repo.to_string(), tag.to_string());
        push_blobs(&client, &reference, image).await;
        push_manifest(&client, &reference, &image.manifest).await;
        image.manifest.digest.clone()
    }

    /// Pushes every image by digest and an index of them (`os/arch` each) as
    /// `<repo>:<tag>`; returns the index digest.
    pub async fn push_index(
        &self,
        repo: &str,
        tag: &str,
        images: &[(&TestImage, &str, &str)],
    ) -> String {
        let (client, _) = self.client().await;
        let reference = Reference::with_tag(self.addr.clone(), repo.to_string(), tag.to_string());
        for (image, _, _) in images {
            push_blobs(&client, &reference, image).await;
            let by_digest = reference.clone_with_digest(image.manifest.digest.clone());
            push_manifest(&client, &by_digest, &image.manifest).await;
        }
        let index = index_blob(images);
        push_manifest(&client, &reference, &index).await;
        index.digest
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn push_blobs(client: &Client, reference: &Reference, image: &TestImage) {
    for blob in image.layers.iter().chain(std::iter::once(&image.config)) {
        client
            .push_blob(reference, blob.data.clone(), &blob.digest)
            .await
            .unwrap_or_else(|e| panic!("push blob {}: {e}", blob.digest));
    }
}

async fn push_manifest(client: &Client, reference: &Reference, manifest: &Blob) {
    let content_type = HeaderValue::from_str(&manifest.media_type).expect("media type");
    client
        .push_manifest_raw(reference, manifest.data.clone(), content_type)
        .await
        .unwrap_or_else(|e| panic!("push manifest {}: {e}", manifest.digest));
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn registry_config(dir: &Path, port: u16, auth: bool) -> String {
    let mut config = format!(
        "version: 0.1\n\
         log:\n  level: warn\n  accesslog:\n    disabled: true\n\
         storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
         http:\n  addr: 127.0.0.1:{port}\n",
        dir.join("data").display()
    );
    if auth {
        config.push_str(&format!(
            "auth:\n  htpasswd:\n    realm: hearth-test\n    path: {}\n",
            dir.join("htpasswd").display()
        ));
    }
    config
}

/// The status code of a plain `GET path` (a readiness probe; pushes and pulls go through
/// oci-client).
fn http_status(addr: &str, path: &str) -> Option<u16> {
    request_status(addr, "GET", path)
}

/// The status code of a bodiless `method path` request.
fn request_status(addr: &str, method: &str, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// One entry of a test layer.
#[derive(Debug, Clone)]
pub enum Entry {
    /// A directory (mode 0755).
    Dir(String),
    /// A regular file with mode and content.
    File(String, u32, Vec<u8>),
    /// A symbolic link: path, target.
    Symlink(String, String),
    /// A hard link: path, the earlier entry it links to.
    HardLink(String, String),
    /// A whiteout: removes `path` of lower layers (`.wh.<name>`).
    Whiteout(String),
    /// An opaque directory: hides the lower layers' content of `dir` (`.wh..wh..opq`).
    Opaque(String),
    /// A regular file whose name is written into the header as is, bypassing the tar
    /// builder's own checks (for hostile names such as `../x`).
    RawName(String, Vec<u8>),
}

/// A layer: its entries in tar order, gzip-compressed or a plain tar.
#[derive(Debug, Clone)]
pub struct LayerSpec {
    /// The entries, parents before children.
    pub entries: Vec<Entry>,
    /// gzip (`tar+gzip`) or a plain `tar`.
    pub gzip: bool,
}

/// The config fields a test image sets.
#[derive(Debug, Clone)]
pub struct ConfigSpec {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `Env` as `K=V`.
    pub env: Vec<String>,
    /// `WorkingDir`.
    pub working_dir: String,
    /// `User`.
    pub user: String,
    /// `architecture` (`amd64`, `arm64`).
    pub architecture: String,
}

impl ConfigSpec {
    /// A config that only sets the entrypoint (amd64, no env, user or directory).
    pub fn running(entrypoint: &[&str]) -> ConfigSpec {
        ConfigSpec {
            entrypoint: entrypoint.iter().map(|s| s.to_string()).collect(),
            cmd: vec![],
            env: vec![],
            working_dir: String::new(),
            user: String::new(),
            architecture: "amd64".into(),
        }
    }
}

/// A blob with its media type and digest.
#[derive(Debug, Clone)]
pub struct Blob {
    /// The media type its descriptor carries.
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// The bytes.
    pub data: Vec<u8>,
}

impl Blob {
    fn new(media_type: &str, data: Vec<u8>) -> Blob {
        Blob {
            media_type: media_type.to_string(),
            digest: format!("sha256:{}", hex::encode(Sha256::digest(&data))),
            data,
        }
    }

    fn descriptor(&self) -> serde_json::Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.data.len()})
    }
}

/// A built image: layers, config and manifest blobs.
#[derive(Debug, Clone)]
pub struct TestImage {
    /// Layer blobs, bottom first.
    pub layers: Vec<Blob>,
    /// The config blob.
    pub config: Blob,
    /// The manifest blob.
    pub manifest: Blob,
    /// The uncompressed tar digests, as in the config's `rootfs.diff_ids`.
    pub diff_ids: Vec<String>,
}

/// Builds the tar (and gzip) of one layer.
pub fn layer_tar(spec: &LayerSpec) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let header = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h
    };
    let split = |path: &str| match path.rsplit_once('/') {
        Some((dir, name)) => (format!("{dir}/"), name.to_string()),
        None => (String::new(), path.to_string()),
    };
    for entry in &spec.entries {
        let result = match entry {
            Entry::Dir(path) => {
                let mut h = header(tar::EntryType::Directory, 0o755, 0);
                builder.append_data(&mut h, format!("{path}/"), std::io::empty())
            }
            Entry::File(path, mode, data) => {
                let mut h = header(tar::EntryType::Regular, *mode, data.len() as u64);
                builder.append_data(&mut h, path, data.as_slice())
            }
            Entry::Symlink(path, target) => {
                let mut h = header(tar::EntryType::Symlink, 0o777, 0);
                builder.append_link(&mut h, path, target)
            }
            Entry::HardLink(path, target) => {
                let mut h = header(tar::EntryType::Link, 0o644, 0);
                builder.append_link(&mut h, path, target)
            }
            Entry::Whiteout(path) => {
                let (dir, name) = split(path);
                let mut h = header(tar::EntryType::Regular, 0o644, 0);
                builder.append_data(&mut h, format!("{dir}.wh.{name}"), std::io::empty())
            }
            Entry::Opaque(dir) => {
                let mut h = header(tar::EntryType::Regular, 0o644, 0);
                builder.append_data(&mut h, format!("{dir}/.wh..wh..opq"), std::io::empty())
            }
            Entry::RawName(name, data) => {
                let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
                let field = &mut h.as_old_mut().name;
                field.fill(0);
                field[..name.len()].copy_from_slice(name.as_bytes());
                h.set_cksum();
                builder.append(&h, data.as_slice())
            }
        };
        result.unwrap_or_else(|e| panic!("tar entry {entry:?}: {e}"));
    }
    builder.into_inner().expect("finish tar")
}

/// Builds an image from layer specs and a config spec.
pub fn build_image(layers: &[LayerSpec], config: &ConfigSpec) -> TestImage {
    let mut blobs = Vec::new();
    let mut diff_ids = Vec::new();
    for spec in layers {
        let tar = layer_tar(spec);
        diff_ids.push(format!("sha256:{}", hex::encode(Sha256::digest(&tar))));
        blobs.push(if spec.gzip {
            let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
            gz.write_all(&tar).expect("gzip");
            Blob::new(LAYER_GZIP, gz.finish().expect("gzip"))
        } else {
            Blob::new(LAYER_TAR, tar)
        });
    }
    let config_json = json!({
        "architecture": config.architecture,
        "os": "linux",
        "config": {
            "Entrypoint": config.entrypoint,
            "Cmd": config.cmd,
            "Env": config.env,
            "WorkingDir": config.working_dir,
            "User": config.user,
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let config_blob = Blob::new(
        OCI_CONFIG,
        serde_json::to_vec(&config_json).expect("config json"),
    );
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config_blob.descriptor(),
        "layers": blobs.iter().map(Blob::descriptor).collect::<Vec<_>>(),
    });
    TestImage {
        layers: blobs,
        config: config_blob,
        manifest: Blob::new(
            OCI_MANIFEST,
            serde_json::to_vec(&manifest).expect("manifest json"),
        ),
        diff_ids,
    }
}

fn index_blob(images: &[(&TestImage, &str, &str)]) -> Blob {
    let manifests: Vec<serde_json::Value> = images
        .iter()
        .map(|(image, os, arch)| {
            let mut d = image.manifest.descriptor();
            d["platform"] = json!({"os": os, "architecture": arch});
            d
        })
        .collect();
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
    Blob::new(OCI_INDEX, serde_json::to_vec(&index).expect("index json"))
}

/// Three layers exercising what an unpacker must get right: layer 1 lays out files
/// (gzip), layer 2 (plain tar) deletes one with a whiteout, makes `/data` opaque and
/// adds a hard link to a file of the same layer, layer 3 (gzip) adds the app, a symlink
/// and padding so its size stands out. After applying: `/etc/motd` absent, `/data`
/// holds only `new` and `new-hard` (one inode), `/bin/app-link -> app`.
pub fn sample_layers(marker: &str) -> Vec<LayerSpec> {
    let f = |path: &str, data: &[u8]| Entry::File(path.to_string(), 0o644, data.to_vec());
    vec![
        LayerSpec {
            gzip: true,
            entries: vec![
                Entry::Dir("etc".into()),
                f("etc/hostname", b"hearth-test\n"),
                f("etc/motd", b"to be removed\n"),
                Entry::Dir("data".into()),
                f("data/old-1", b"old\n"),
                f("data/old-2", b"old\n"),
                Entry::Dir("bin".into()),
            ],
        },
        LayerSpec {
            gzip: false,
            entries: vec![
                Entry::Whiteout("etc/motd".into()),
                Entry::Dir("data".into()),
                Entry::Opaque("data".into()),
                f("data/new", b"new\n"),
                Entry::HardLink("data/new-hard".into(), "data/new".into()),
            ],
        },
        LayerSpec {
            gzip: true,
            entries: vec![
                Entry::File(
                    "bin/app".into(),
                    0o755,
                    format!("#!/bin/sh\necho {marker}\n").into_bytes(),
                ),
                Entry::Symlink("bin/app-link".into(), "app".into()),
                // Incompressible padding (a simple LCG) so this layer is the largest.
                f("srv/padding", &pseudo_random(64 << 10, marker.len() as u64)),
            ],
        },
    ]
}

/// The config every sample image carries.
pub fn sample_config(architecture: &str) -> ConfigSpec {
    ConfigSpec {
        entrypoint: vec!["/bin/app".into(), "--serve".into()],
        cmd: vec!["--port".into(), "8080".into()],
        env: vec!["PATH=/usr/bin:/bin".into(), "GREETING=hello world".into()],
        working_dir: "/srv".into(),
        user: "1000:1000".into(),
        architecture: architecture.into(),
    }
}

/// A sample image whose content differs by `marker`.
pub fn sample_image(marker: &str) -> TestImage {
    build_image(&sample_layers(marker), &sample_config("amd64"))
}

/// Incompressible bytes from a small LCG, the same for the same seed.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (x >> 56) as u8
        })
        .collect()
}

/// Writes `image` as an OCI layout at `dir`, tagged `tag` in `index.json`.
pub fn write_layout(dir: &Path, tag: &str, image: &TestImage) -> PathBuf {
    let blobs = dir.join("blobs").join("sha256");
    std::fs::create_dir_all(&blobs).expect("layout blobs dir");
    for blob in image.layers.iter().chain([&image.config, &image.manifest]) {
        let hex = blob.digest.trim_start_matches("sha256:");
        std::fs::write(blobs.join(hex), &blob.data).expect("write layout blob");
    }
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
        .expect("write oci-layout");
    let mut entry = image.manifest.descriptor();
    entry["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]});
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&index).expect("json"),
    )
    .expect("write index.json");
    dir.to_path_buf()
}

/// A layer with the host's static busybox as `/bin/busybox`.
pub fn busybox_layer() -> LayerSpec {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox-static");
    LayerSpec {
        gzip: true,
        entries: vec![
            Entry::Dir("bin".into()),
            Entry::File(
                "bin/busybox".into(),
                0o755,
                std::fs::read(busybox).expect("read busybox"),
            ),
            Entry::Symlink("bin/sh".into(), "busybox".into()),
        ],
    }
}

/// An image whose workload reports what it sees to its log, then serves on port 8080 (so
/// that Ready, which waits for the port, comes after the report): the user, the working
/// directory, the env, and what the layers left.
pub fn bootable_image(marker: &str) -> TestImage {
    let mut layers = vec![busybox_layer()];
    layers.extend(sample_layers(marker));
    let script = "echo \"seen $GREETING as $(/bin/busybox id -u):$(/bin/busybox id -g) in $(pwd); \
        motd $(test -e /etc/motd && echo present || echo gone); \
        data $(/bin/busybox ls /data | /bin/busybox tr '\\n' ' '); \
        link $(/bin/busybox readlink /bin/app-link); \
        inodes $(/bin/busybox stat -c %i /data/new /data/new-hard | /bin/busybox tr '\\n' ' ')\"; \
        exec /bin/busybox httpd -f -p 8080 -h /srv";
    build_image(
        &layers,
        &ConfigSpec {
            entrypoint: vec!["/bin/busybox".into(), "sh".into(), "-c".into()],
            cmd: vec![script.into()],
            env: vec!["PATH=/bin".into(), format!("GREETING=hello-{marker}")],
            working_dir: "/srv".into(),
            user: "1000:1000".into(),
            architecture: "amd64".into(),
        },
    )
}
