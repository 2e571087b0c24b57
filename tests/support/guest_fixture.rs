//! The QEMU guest fixture of the guest tests (`guest_boot`, `guest_claim`): the kit and a
//! busybox root image built once per test binary, test-unique names, the QEMU driver, a
//! drop guard for the VMMs and network namespaces a test makes, machine directories,
//! test network namespaces with a tap, and HTTP from inside a namespace.
//!
//! Host resources carry test-unique names (`hgt-<pid>-<tag><n>`); VMMs carry [`PREFIX`].

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use hearth::guest::config::{GuestConfig, GuestNetwork, write_config_disk};
use hearth::guest::kit::GuestKit;
use hearth::vmm::{LaunchSpec, QemuDriver, TapSpec, VmmDriver, find_processes};

use super::guest_prereqs::{QEMU, guest_prereqs};

/// Marker prefix of every VMM these tests start (never the daemon's).
pub const PREFIX: &str = "hearthtest-";

/// The busybox applets a root image links.
const APPLETS: &[&str] = &[
    "sh", "sleep", "echo", "cat", "httpd", "true", "date", "hostname",
];

/// What every test needs, built once per test binary.
pub struct Fixture {
    pub kit: GuestKit,
    /// A root image with busybox; each guest boots a copy.
    pub root_template: PathBuf,
    /// Accelerator cache for the driver.
    pub cache_dir: PathBuf,
    _dir: tempfile::TempDir,
}

/// The fixture, or `None` (after a loud message naming `suite`) when a prerequisite is
/// missing.
pub fn fixture(suite: &str) -> Option<&'static Fixture> {
    static FIXTURE: OnceLock<Option<Fixture>> = OnceLock::new();
    FIXTURE.get_or_init(|| build_fixture(suite)).as_ref()
}

fn build_fixture(suite: &str) -> Option<Fixture> {
    let prereqs = guest_prereqs(suite)?;
    let (kit, busybox) = (prereqs.kit, prereqs.busybox);
    let dir = tempfile::tempdir().expect("tempdir");
    // Older kit entries (from earlier builds of the init in this target directory) are
    // garbage.
    if let Some(cache) = kit.vmlinux.parent().and_then(Path::parent) {
        for ent in std::fs::read_dir(cache).into_iter().flatten().flatten() {
            if ent.file_name() != kit.id.as_str() {
                let _ = std::fs::remove_dir_all(ent.path());
            }
        }
    }
    let root_template = dir.path().join("root.img");
    busybox_root_image(&busybox, &dir.path().join("rootfs"), &root_template);
    Some(Fixture {
        kit,
        root_template,
        cache_dir: dir.path().join("cache"),
        _dir: dir,
    })
}

/// Makes the ext4 `image` (32 MiB) from a tree built at `tree`: the usual directories,
/// `busybox` with its applets in `/bin`, and `/www/index.html`.
pub fn busybox_root_image(busybox: &Path, tree: &Path, image: &Path) {
    for d in ["bin", "etc", "var/log", "tmp", "www", "proc", "sys", "dev"] {
        std::fs::create_dir_all(tree.join(d)).expect("mkdir");
    }
    std::fs::copy(busybox, tree.join("bin/busybox")).expect("copy busybox");
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", tree.join("bin").join(applet)).expect("symlink");
    }
    std::fs::write(tree.join("www/index.html"), "hello from the guest\n").expect("index");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-d"])
        .arg(tree)
        .arg(image)
        .arg("32M"));
}

/// Runs `cmd` and returns its stdout; panics with its stderr on failure.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A name unique to this process and call: `hgt-<pid>-<tag><n>`.
pub fn unique(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "hgt-{}-{}{}",
        std::process::id(),
        tag,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A QEMU driver whose VMMs carry [`PREFIX`].
pub fn driver(fx: &Fixture) -> VmmDriver {
    VmmDriver::Qemu(
        QemuDriver::new(PathBuf::from(QEMU), fx.cache_dir.clone()).with_name_prefix(PREFIX),
    )
}

/// Kills the test's VMMs and deletes its network namespaces, whatever happened.
#[derive(Default)]
pub struct Cleanup {
    pub machines: Vec<String>,
    pub netns: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for (id, pid) in find_processes(PREFIX) {
            if self.machines.contains(&id) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        for ns in &self.netns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A machine directory with a fresh root disk and a config disk.
pub struct Machine {
    pub spec: LaunchSpec,
    _dir: tempfile::TempDir,
}

/// A machine for `config` (1 vCPU, 128 MiB, no network), its VMM killed by `cleanup`.
pub fn machine(fx: &Fixture, cleanup: &mut Cleanup, config: &GuestConfig) -> Machine {
    let dir = tempfile::tempdir().expect("machine dir");
    let root_disk = dir.path().join("root.img");
    std::fs::copy(&fx.root_template, &root_disk).expect("root disk");
    let config_disk = dir.path().join("config.img");
    write_config_disk(&config_disk, config).expect("config disk");
    cleanup.machines.push(config.machine_id.clone());
    Machine {
        spec: LaunchSpec {
            machine_id: config.machine_id.clone(),
            workdir: dir.path().to_path_buf(),
            netns: None,
            tap: None,
            vcpus: 1,
            memory_mib: 128,
            kit: fx.kit.clone(),
            root_disk,
            base_disk: None,
            config_disk,
            confine: Default::default(),
        },
        _dir: dir,
    }
}

/// A network namespace with a tap device whose host end has `host_ip`/30.
pub struct TestNet {
    pub name: String,
    pub tap: String,
    pub host_ip: Ipv4Addr,
}

impl TestNet {
    /// The guest's side of the /30: `guest_ip`, with the host end as its gateway.
    pub fn guest_network(&self, guest_ip: Ipv4Addr) -> GuestNetwork {
        GuestNetwork {
            address: guest_ip,
            prefix_len: 30,
            gateway: self.host_ip,
            resolver: None,
        }
    }

    /// Puts the machine's VMM in this namespace, on its tap with `mac`.
    pub fn attach(&self, spec: &mut LaunchSpec, mac: [u8; 6]) {
        spec.netns = Some(self.name.clone());
        spec.tap = Some(TapSpec {
            name: self.tap.clone(),
            mac,
        });
    }
}

pub fn test_net(cleanup: &mut Cleanup, host_ip: Ipv4Addr) -> TestNet {
    let name = unique("ns");
    cleanup.netns.push(name.clone());
    let tap = "tap0".to_string();
    run(Command::new("ip").args(["netns", "add", &name]));
    let ip = |args: &[&str]| {
        run(Command::new("ip").args(["-n", name.as_str()]).args(args));
    };
    ip(&["link", "set", "lo", "up"]);
    ip(&["tuntap", "add", "dev", &tap, "mode", "tap"]);
    ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &tap]);
    ip(&["link", "set", &tap, "up"]);
    TestNet { name, tap, host_ip }
}

/// `GET /index.html` from inside network namespace `ns` (on a thread of its own, since
/// `setns` changes the calling thread): the HTTP response and the connect time.
pub fn http_get_in_netns(ns: &str, addr: SocketAddr) -> (String, Duration) {
    let ns_path = Path::new("/run/netns").join(ns);
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        let f = std::fs::File::open(&ns_path).expect("open netns");
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let t = Instant::now();
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
        let connect = t.elapsed();
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")
            .expect("send");
        let mut body = String::new();
        s.read_to_string(&mut body).expect("read");
        (body, connect)
    })
    .join()
    .expect("netns thread")
}

/// A file from an ext4 image (read with debugfs, without mounting).
pub fn read_from_image(image: &Path, path: &str) -> String {
    run(Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {path}"))
        .arg(image))
}

/// Asserts that no VMM for `id` runs and that its `pid` was reaped (gone from /proc, or
/// reused by another process, but not a zombie).
pub fn assert_no_vmm(id: &str, pid: i32) {
    assert!(
        !find_processes(PREFIX).iter().any(|(i, _)| i == id),
        "a VMM for {id} is still running"
    );
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(
        !stat.contains(") Z "),
        "VMM pid {pid} left as a zombie: {stat}"
    );
}
