//! What the Firecracker tests need to know about this host: the binary
//! (`HEARTH_FIRECRACKER`), the guest kit, and whether KVM here boots the guest kernel
//! (the accelerator probe's answer, cached on disk like the daemon's).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use hearth::guest::config::{GuestConfig, write_config_disk};
use hearth::guest::kit::{GuestKit, KitSource};
use hearth::vmm::{Accel, LaunchSpec, QemuDriver, TapSpec};

/// The host's Firecracker setup.
pub struct FirecrackerEnv {
    /// The binary.
    pub firecracker: PathBuf,
    /// The jailer, if one is configured or sits beside the binary.
    pub jailer: Option<PathBuf>,
    /// The guest kit the tests boot.
    pub kit: GuestKit,
    /// Whether KVM on this host boots the guest kernel.
    pub kvm_boots: bool,
}

/// The setup, or `None` after a loud message saying why the Firecracker tests skip.
pub fn firecracker_env() -> Option<&'static FirecrackerEnv> {
    static ENV: OnceLock<Option<FirecrackerEnv>> = OnceLock::new();
    ENV.get_or_init(build).as_ref()
}

fn build() -> Option<FirecrackerEnv> {
    let skip = |why: String| {
        super::skipped("firecracker tests", &why);
        None
    };
    let Some(firecracker) = std::env::var_os("HEARTH_FIRECRACKER").map(PathBuf::from) else {
        return skip(
            "HEARTH_FIRECRACKER is not set (point it at a firecracker v1.x binary)".into(),
        );
    };
    if !nix::unistd::geteuid().is_root() {
        return skip("not running as root".into());
    }
    let jailer = std::env::var_os("HEARTH_JAILER")
        .map(PathBuf::from)
        .or_else(|| firecracker.parent().map(|d| d.join("jailer")))
        .filter(|p| p.is_file());
    let kernel_dir = std::env::var_os("HEARTH_KERNEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/local/lib/hearth/kernel"));
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_hearthd"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let kit = GuestKit::ensure(
        &KitSource {
            kernel_dir,
            init_binary: bin_dir.join("hearth-init-static"),
        },
        &bin_dir.join("hearth-test-kit"),
    )
    .expect("guest kit (run deploy/install-guest-kernel.sh and deploy/build-guest-init.sh)");
    // The probe is async and callers may be inside a runtime: a thread of its own.
    let (probe_kit, probe_cache) = (kit.clone(), bin_dir.join("hearth-test-probe"));
    let accel = std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        runtime.block_on(
            QemuDriver::new("qemu-system-x86_64".into(), probe_cache).accel_for(&probe_kit),
        )
    })
    .join()
    .expect("probe thread");
    let kvm_boots = accel == Accel::Kvm;
    if !kvm_boots {
        eprintln!(
            "\n*** firecracker tests: KVM on this host cannot boot guest kernel {}: checking \
             everything up to the guest's readiness, not the readiness itself ***\n",
            kit.kernel_version
        );
    }
    Some(FirecrackerEnv {
        firecracker,
        jailer,
        kit,
        kvm_boots,
    })
}

/// The daemon config that runs machines on this Firecracker; a guest that cannot boot
/// here fails fast (one attempt, a short readiness deadline).
pub fn daemon_config(env: &FirecrackerEnv) -> String {
    format!(
        "[vmm]\nkind = \"firecracker\"\nfirecracker_binary = \"{}\"\n[guest]\nready_timeout_secs = {}\nboot_attempts = 1\nstop_grace_secs = 1\n",
        env.firecracker.display(),
        if env.kvm_boots { 60 } else { 3 },
    )
}

/// A namespace with a tap `tap0` in it, for machines started outside a daemon; deleted
/// on drop.
pub struct ScratchNetns {
    /// Its name under /run/netns.
    pub name: String,
}

impl ScratchNetns {
    /// Creates `name` with its tap.
    pub fn create(name: &str) -> ScratchNetns {
        let ns = ScratchNetns {
            name: name.to_string(),
        };
        for args in [
            vec!["netns", "add", name],
            vec![
                "netns", "exec", name, "ip", "tuntap", "add", "dev", "tap0", "mode", "tap",
            ],
        ] {
            let out = std::process::Command::new("ip")
                .args(&args)
                .output()
                .expect("ip");
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        ns
    }
}

impl Drop for ScratchNetns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A launch spec for machine `id` in `dir` with throwaway disks (Firecracker only needs
/// them to exist until the guest reads them), on `netns`'s `tap0`.
pub fn scratch_spec(env: &FirecrackerEnv, dir: &Path, id: &str, netns: &str) -> LaunchSpec {
    let root_disk = dir.join("root.img");
    std::fs::write(&root_disk, vec![0u8; 1 << 20]).expect("root disk");
    let config_disk = dir.join("config.img");
    write_config_disk(
        &config_disk,
        &GuestConfig {
            machine_id: id.to_string(),
            hostname: id.to_string(),
            network: None,
            command: vec!["/bin/sh".into()],
            env: vec![],
            workdir: None,
            ports: vec![],
            user: None,
            prepared: false,
            overlay_root: false,
        },
    )
    .expect("config disk");
    LaunchSpec {
        machine_id: id.to_string(),
        workdir: dir.to_path_buf(),
        netns: Some(netns.to_string()),
        tap: Some(TapSpec {
            name: "tap0".into(),
            mac: [0x06, 0, 0xac, 0x10, 0, 2],
        }),
        vcpus: 1,
        memory_mib: 128,
        kit: env.kit.clone(),
        root_disk,
        base_disk: None,
        config_disk,
        confine: Default::default(),
    }
}
