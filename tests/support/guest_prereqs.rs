//! What a test that boots a real guest needs on the host, checked in one place: root, the
//! extracted guest kernel, the static init, busybox and QEMU. A missing piece is said
//! loudly and the suite skips.

use std::path::{Path, PathBuf};
use std::process::Command;

use hearth::guest::kit::{GuestKit, KitSource};

/// The QEMU binary the guest tests run.
pub const QEMU: &str = "qemu-system-x86_64";

/// The pieces every guest test uses.
pub struct GuestPrereqs {
    /// The guest kit (kernel + initramfs with the static init), from the shared test cache.
    pub kit: GuestKit,
    /// A static busybox for root images.
    pub busybox: PathBuf,
}

/// The guest kernel's directory (`HEARTH_KERNEL_DIR`, else the installed default).
pub fn kernel_dir() -> PathBuf {
    std::env::var_os("HEARTH_KERNEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/local/lib/hearth/kernel"))
}

/// The static init (`HEARTH_INIT_BINARY`, else beside the test binaries).
pub fn static_init() -> PathBuf {
    std::env::var_os("HEARTH_INIT_BINARY")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_BIN_EXE_hearth-init")).with_file_name("hearth-init-static")
        })
}

/// Checks the host for `suite` and builds the kit; `None` after a loud skip message.
pub fn guest_prereqs(suite: &str) -> Option<GuestPrereqs> {
    let skip = |why: String| {
        super::skipped(&format!("{suite} tests"), &why);
        None
    };
    if !nix::unistd::geteuid().is_root() {
        return skip("not running as root".into());
    }
    let kdir = kernel_dir();
    if !kdir.join("boot").is_dir() {
        return skip(format!(
            "no guest kernel in {} (run deploy/install-guest-kernel.sh)",
            kdir.display()
        ));
    }
    let init = static_init();
    if !init.is_file() {
        return skip(format!(
            "no static init at {} (run deploy/build-guest-init.sh)",
            init.display()
        ));
    }
    let Some(busybox) = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
    else {
        return skip("no busybox (install busybox-static)".into());
    };
    if Command::new(QEMU).arg("--version").output().is_err() {
        return skip(format!("no {QEMU} (install qemu-system-x86)"));
    }
    // The kit cache outlives the run (the next run with the same inputs reuses it) and
    // belongs to this target directory, so test runs of other checkouts never share it.
    let kit_cache = Path::new(env!("CARGO_BIN_EXE_hearth-init")).with_file_name("hearth-test-kit");
    let source = KitSource {
        kernel_dir: kdir,
        init_binary: init,
    };
    let kit = GuestKit::ensure(&source, &kit_cache).expect("guest kit");
    Some(GuestPrereqs { kit, busybox })
}
