//! Which accelerator QEMU uses: KVM when it can boot the guest kernel, TCG otherwise.
//!
//! Why probe instead of checking `/dev/kvm`: a host's KVM may exist and still be unable to
//! run a stock kernel (e.g. the PVM flavour used for nested setups: QEMU aborts on an MSR
//! or the guest hangs). The only reliable answer is to boot the kit once with
//! `-accel kvm` and a kernel flag that makes the init print a line and power off at once.
//!
//! The answer is cached on disk, keyed by the guest kernel release, the host kernel
//! release and the QEMU binary: the init inside the kit has no say in whether KVM can run
//! the kernel, so rebuilding it does not cost another probe.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::guest::kit::GuestKit;
use crate::guest::{PROBE_CMDLINE_FLAG, PROBE_READY_LINE};

/// How long a KVM boot may take to reach the init; a working KVM needs well under a
/// second, a broken one either aborts at once or hangs.
const PROBE_DEADLINE: Duration = Duration::from_secs(8);

/// A QEMU accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// Software emulation (always works, slower).
    Tcg,
}

impl Accel {
    /// The value of QEMU's `-accel`.
    pub fn qemu_name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The host kernel release (`uname -r`).
pub fn host_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The cache file of the probe's answer for this kit, host and QEMU.
fn cache_file(qemu: &Path, kit: &GuestKit, cache_dir: &Path) -> PathBuf {
    let mut h = Sha256::new();
    for part in [
        kit.kernel_version.as_bytes(),
        host_release().as_bytes(),
        qemu.as_os_str().as_encoded_bytes(),
    ] {
        h.update(part);
        h.update([0]);
    }
    cache_dir.join(format!("accel-{}.json", hex::encode(&h.finalize()[..12])))
}

/// Whether KVM can boot `kit` on this host with this QEMU; see the module docs.
///
/// Idempotent: the first call boots a probe guest (up to a few seconds) and caches the
/// answer in `cache_dir`; later calls read the cache. Undo: delete the cache file (the next
/// call probes again). Never fails: anything that goes wrong means TCG.
pub async fn probe_accel(qemu: &Path, kit: &GuestKit, cache_dir: &Path) -> Accel {
    let cache = cache_file(qemu, kit, cache_dir);
    if let Ok(text) = tokio::fs::read_to_string(&cache).await
        && let Ok(accel) = serde_json::from_str::<Accel>(&text)
    {
        return accel;
    }
    let accel = if Path::new("/dev/kvm").exists() {
        probe_boot(qemu, kit, cache_dir).await
    } else {
        Accel::Tcg
    };
    if tokio::fs::create_dir_all(cache_dir).await.is_ok() {
        let tmp = cache.with_extension(format!("tmp{}", std::process::id()));
        let body = serde_json::to_string(&accel).unwrap_or_default();
        if tokio::fs::write(&tmp, body).await.is_ok() {
            let _ = tokio::fs::rename(&tmp, &cache).await;
        }
    }
    accel
}

/// Boots the kit under KVM in probe mode; KVM only if the init's line reached the console
/// and QEMU exited by itself in time.
async fn probe_boot(qemu: &Path, kit: &GuestKit, cache_dir: &Path) -> Accel {
    // A private directory for the probe's console log, removed afterwards.
    let dir = cache_dir.join(format!(".accel-probe-{}", std::process::id()));
    if tokio::fs::create_dir_all(&dir).await.is_err() {
        return Accel::Tcg;
    }
    let accel = probe_in(qemu, kit, &dir).await;
    let _ = tokio::fs::remove_dir_all(&dir).await;
    accel
}

async fn probe_in(qemu: &Path, kit: &GuestKit, dir: &Path) -> Accel {
    let serial = dir.join("serial.log");
    let mut cmd = tokio::process::Command::new(qemu);
    cmd.args([
        "-M",
        "microvm",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
    ])
    .args([
        "-no-reboot",
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-smp",
        "1",
        "-m",
        "256",
    ])
    .arg("-kernel")
    .arg(&kit.vmlinux)
    .arg("-initrd")
    .arg(&kit.initramfs)
    .arg("-append")
    .arg(format!("console=ttyS0 panic=-1 quiet {PROBE_CMDLINE_FLAG}"))
    .arg("-serial")
    .arg(format!("file:{}", super::qemu::escape(&serial)))
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .kill_on_drop(true);
    let Ok(mut child) = cmd.spawn() else {
        return Accel::Tcg;
    };
    let exited = tokio::time::timeout(PROBE_DEADLINE, child.wait()).await;
    if exited.is_err() {
        let _ = child.kill().await;
    }
    let console = tokio::fs::read_to_string(&serial).await.unwrap_or_default();
    match exited {
        Ok(Ok(_)) if console.contains(PROBE_READY_LINE) => Accel::Kvm,
        _ => Accel::Tcg,
    }
}
