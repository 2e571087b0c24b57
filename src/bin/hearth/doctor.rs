//! `hearth doctor`: what this host needs to run hearthd, each with a verdict and the fix.
//!
//! Works without a running daemon (it reads the daemon's config, then asks the socket
//! last), so it is the first thing to run on a new host or at 3 a.m. Exits 1 when any
//! check fails; a warning (no KVM, the daemon not running) does not.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use comfy_table::Table;
use hearth::config::{Config, VmmKind};
use hearth::image::space::FreeSpace;
use serde_json::json;

/// A check's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Ok,
    Warn,
    Fail,
}

impl Verdict {
    /// Ok when `ok`, else `otherwise`.
    fn of(ok: bool, otherwise: Verdict) -> Verdict {
        if ok { Verdict::Ok } else { otherwise }
    }

    fn word(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
        }
    }
}

struct Check {
    name: &'static str,
    verdict: Verdict,
    detail: String,
    fix: String,
}

fn check(name: &'static str, verdict: Verdict, detail: impl Into<String>, fix: &str) -> Check {
    Check {
        name,
        verdict,
        detail: detail.into(),
        fix: if verdict == Verdict::Ok {
            String::new()
        } else {
            fix.to_string()
        },
    }
}

/// The config the daemon would read: `path`, else `/etc/hearth/hearthd.toml` when
/// present, else the defaults.
fn config(path: Option<&Path>) -> Result<(Config, String), String> {
    let default = Path::new("/etc/hearth/hearthd.toml");
    match path {
        Some(p) => Config::load(p)
            .map(|c| (c, p.display().to_string()))
            .map_err(|e| e.to_string()),
        None if default.exists() => Config::load(default)
            .map(|c| (c, default.display().to_string()))
            .map_err(|e| e.to_string()),
        None => Config::parse("", Path::new("<defaults>"))
            .map(|c| (c, "the defaults".to_string()))
            .map_err(|e| e.to_string()),
    }
}

fn root() -> Check {
    let is_root = nix::unistd::geteuid().is_root();
    check(
        "root",
        Verdict::of(is_root, Verdict::Warn),
        if is_root {
            "running as root"
        } else {
            "not root: hearthd must run as root (namespaces, links, taps, cgroups)"
        },
        "run hearthd (and this check) as root",
    )
}

fn kvm() -> Check {
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    check(
        "kvm",
        Verdict::of(usable, Verdict::Warn),
        if usable {
            "/dev/kvm is usable: guests run with hardware virtualisation"
        } else {
            "no usable /dev/kvm: QEMU runs guests under TCG (software emulation), much slower; Firecracker cannot run"
        },
        "enable virtualisation (firmware, or nested virtualisation on the VM host) and load kvm_intel or kvm_amd",
    )
}

/// `program` as a path, or found on PATH.
fn find_program(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return program.is_file().then(|| program.to_path_buf());
    }
    std::env::var_os("PATH")?
        .to_string_lossy()
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
}

fn vmm(config: &Config) -> Check {
    if config.vmm.kind == VmmKind::Firecracker {
        let found = find_program(&config.vmm.firecracker_binary);
        return check(
            "vmm",
            Verdict::of(found.is_some(), Verdict::Fail),
            match &found {
                Some(p) => format!("Firecracker at {}", p.display()),
                None => format!(
                    "vmm.firecracker_binary {:?} not found",
                    config.vmm.firecracker_binary
                ),
            },
            "point vmm.firecracker_binary at a Firecracker v1.x binary, or set vmm.kind = \"qemu\"",
        );
    }
    let found = find_program(&config.vmm.qemu_binary);
    check(
        "vmm",
        Verdict::of(found.is_some(), Verdict::Fail),
        match &found {
            Some(p) => format!("QEMU at {}", p.display()),
            None => format!("vmm.qemu_binary {:?} not found", config.vmm.qemu_binary),
        },
        "apt-get install qemu-system-x86 (or bash deploy/install-deps.sh)",
    )
}

fn nftables() -> Check {
    let ran = Command::new("nft").args(["list", "tables"]).output();
    let (verdict, detail) = match ran {
        Ok(out) if out.status.success() => (Verdict::Ok, "nft answers".to_string()),
        Ok(out) => (
            Verdict::Fail,
            format!(
                "nft list tables failed: {}",
                hearth::text::bounded_printable(&String::from_utf8_lossy(&out.stderr), 200)
            ),
        ),
        Err(e) => (Verdict::Fail, format!("no nft: {e}")),
    };
    check(
        "nftables",
        verdict,
        detail,
        "apt-get install nftables (or bash deploy/install-deps.sh); it needs root",
    )
}

fn cgroups() -> Check {
    let root = Path::new("/sys/fs/cgroup");
    let v2 = std::fs::read_to_string(root.join("cgroup.controllers")).ok();
    let (verdict, detail) = match v2 {
        Some(controllers) => {
            let has = |c: &str| controllers.split_whitespace().any(|w| w == c);
            if has("cpu") && has("memory") {
                (
                    Verdict::Ok,
                    "cgroup v2 with the cpu and memory controllers".to_string(),
                )
            } else {
                (
                    Verdict::Fail,
                    format!("cgroup v2 without cpu or memory: {}", controllers.trim()),
                )
            }
        }
        None if root.join("cpu").is_dir() && root.join("memory").is_dir() => (
            Verdict::Ok,
            "cgroup v1 with the cpu and memory hierarchies".to_string(),
        ),
        None => (
            Verdict::Fail,
            "no cpu and memory cgroups under /sys/fs/cgroup".to_string(),
        ),
    };
    check(
        "cgroups",
        verdict,
        detail,
        "mount cgroups (v2: the cpu and memory controllers enabled at the root)",
    )
}

fn guest_kernel(config: &Config) -> Check {
    // The very lookup the guest kit makes: one vmlinuz-* under boot/.
    let found = hearth::guest::kit::find_kernel_image(&config.guest.kernel_dir);
    check(
        "guest kernel",
        Verdict::of(found.is_ok(), Verdict::Fail),
        match &found {
            Ok((path, _)) => path.display().to_string(),
            Err(e) => e.to_string(),
        },
        "bash deploy/install-guest-kernel.sh (or set guest.kernel_dir)",
    )
}

fn guest_init(config: &Config) -> Check {
    let init = config.init_binary();
    let (verdict, detail) = match std::fs::read(&init) {
        Ok(bytes) => match hearth::elf::check_static(&bytes) {
            Ok(()) => (Verdict::Ok, format!("{} (static)", init.display())),
            Err(e) => (Verdict::Fail, format!("{}: {e}", init.display())),
        },
        Err(e) => (Verdict::Fail, format!("{}: {e}", init.display())),
    };
    check(
        "guest init",
        verdict,
        detail,
        "bash deploy/build-guest-init.sh release, and put hearth-init-static beside hearthd (or set guest.init_binary)",
    )
}

/// The check hearthd makes at start: the VMMs can reach the guest kit, and the data dir
/// keeps their files' owners.
fn vmm_layout(config: &Config) -> Check {
    let result = hearth::vmm::confine::check_layout(&config.layout(), &config.vmm);
    let detail = match &result {
        Ok(()) if !config.vmm.unprivileged => "VMMs run as root".to_string(),
        Ok(()) => format!(
            "VMMs (uid {}+) reach the guest kit in {}; {} keeps their owners",
            config.vmm.uid_base,
            config.cache_dir.display(),
            config.data_dir.display()
        ),
        Err(e) => e.clone(),
    };
    check(
        "vmm layout",
        Verdict::of(result.is_ok(), Verdict::Fail),
        detail,
        "as the detail says (hearthd refuses to start until it is fixed)",
    )
}

fn free_space(config: &Config) -> Check {
    let dir = &config.data_dir;
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let keep = config.capacity.min_free_mib;
    let (verdict, detail) = match FreeSpace::Statvfs.available(existing) {
        Ok(bytes) => {
            let free = bytes >> 20;
            let verdict = Verdict::of(free > keep, Verdict::Fail);
            (
                verdict,
                format!(
                    "{free} MiB free for {} (capacity.min_free_mib keeps {keep} MiB)",
                    dir.display()
                ),
            )
        }
        Err(e) => (Verdict::Fail, e.to_string()),
    };
    check(
        "free space",
        verdict,
        detail,
        "free space on the data dir's file system, or move data_dir",
    )
}

async fn socket(path: &Path) -> Check {
    use std::os::unix::fs::PermissionsExt;
    let fix = "start hearthd (systemctl start hearthd, or hearthd --config ...)";
    let mode = match std::fs::metadata(path) {
        Ok(meta) => meta.permissions().mode() & 0o777,
        Err(e) => {
            return check(
                "socket",
                Verdict::Warn,
                format!("{}: {e}: hearthd is not running", path.display()),
                fix,
            );
        }
    };
    if mode & 0o077 != 0 {
        return check(
            "socket",
            Verdict::Fail,
            format!(
                "{} has mode {mode:o}: others than its owner can drive the daemon",
                path.display()
            ),
            "restart hearthd (it creates the socket 0600); check what changed its mode",
        );
    }
    let answer = async {
        let mut client = hearth::client::connect(path)
            .await
            .map_err(|e| e.to_string())?;
        client
            .node
            .get_node(hearth::api::pb::GetNodeRequest {})
            .await
            .map(|n| n.into_inner().version)
            .map_err(|e| e.message().to_string())
    };
    match tokio::time::timeout(std::time::Duration::from_secs(5), answer).await {
        Ok(Ok(version)) => check(
            "socket",
            Verdict::Ok,
            format!("{} (mode 600): hearthd {version} answers", path.display()),
            fix,
        ),
        Ok(Err(e)) => check(
            "socket",
            Verdict::Warn,
            format!(
                "{}: no answer: {}",
                path.display(),
                hearth::text::bounded_printable(&e, 200)
            ),
            fix,
        ),
        Err(_) => check(
            "socket",
            Verdict::Warn,
            format!("{}: no answer within 5 s", path.display()),
            fix,
        ),
    }
}

/// Runs every check and prints them; exit status 1 when one fails.
pub async fn run(
    socket_path: &Path,
    config_path: Option<&Path>,
    json: bool,
) -> Result<ExitCode, String> {
    let (config, origin) = config(config_path)?;
    let socket_path = if socket_path == Path::new(super::DEFAULT_SOCKET) {
        config.api.socket.clone()
    } else {
        socket_path.to_path_buf()
    };
    let checks = vec![
        root(),
        kvm(),
        vmm(&config),
        nftables(),
        cgroups(),
        guest_kernel(&config),
        guest_init(&config),
        vmm_layout(&config),
        free_space(&config),
        socket(&socket_path).await,
    ];
    if json {
        let all: Vec<_> = checks
            .iter()
            .map(|c| {
                json!({"check": c.name, "verdict": c.verdict.word(), "detail": c.detail, "fix": c.fix})
            })
            .collect();
        outln!("{}", serde_json::Value::Array(all));
    } else {
        outln!("config: {origin}");
        let mut table = Table::new();
        table.set_header(["check", "verdict", "detail", "fix"]);
        for c in &checks {
            table.add_row([c.name, c.verdict.word(), c.detail.as_str(), c.fix.as_str()]);
        }
        outln!("{table}");
    }
    Ok(if checks.iter().any(|c| c.verdict == Verdict::Fail) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
