//! Which VMM driver a daemon runs, from its configuration and what the host can do.
//!
//! `auto` picks Firecracker only when a binary is configured and KVM can boot the guest
//! kernel: Firecracker has no software emulation, so on a host whose KVM cannot run the
//! kernel (a nested PVM host, for one) every guest would hang. Whether KVM can boot the
//! kernel is the QEMU accelerator probe's answer (one boot, cached on disk per kernel,
//! host kernel and QEMU binary): the same KVM runs both VMMs.

use std::path::{Path, PathBuf};

use super::accel::Accel;
use super::firecracker::jailer::JailerSettings;
use super::settings::{VmmConfig, VmmKind};
use super::{FirecrackerDriver, QemuDriver, VmmDriver};
use crate::guest::kit::{GuestKit, KitSource};
use crate::layout::Layout;

/// The driver chosen, and why.
pub struct Choice {
    /// The driver.
    pub driver: VmmDriver,
    /// One line for the log: why this driver.
    pub reason: String,
}

/// Why no driver could be set up.
#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    /// A configured binary is missing.
    #[error("{key}: {path}: {reason}")]
    Binary {
        /// The config key.
        key: &'static str,
        /// The path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A setting has a value it cannot have.
    #[error("{key}: {reason}")]
    Value {
        /// The config key.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// `kind = "firecracker"` without a binary.
    #[error("vmm.firecracker_binary: required when vmm.kind = \"firecracker\"")]
    NoFirecracker,
    /// The guest kit (needed for the probe) could not be built.
    #[error("vmm.kind = \"auto\": the guest kit for the KVM probe: {0}")]
    Kit(String),
}

/// Chooses and builds the driver. With `auto` and a Firecracker binary this builds the
/// guest kit from `kit` and runs the KVM probe (both cached after the first time).
pub async fn choose(
    vmm: &VmmConfig,
    layout: &Layout,
    kit: KitSource,
) -> Result<Choice, SelectError> {
    let qemu = || QemuDriver::new(vmm.qemu_binary.clone(), layout.vmm_cache());
    match vmm.kind {
        VmmKind::Qemu => Ok(Choice {
            driver: VmmDriver::Qemu(qemu()),
            reason: "vmm.kind = \"qemu\"".into(),
        }),
        VmmKind::Firecracker => {
            if vmm.firecracker_binary.as_os_str().is_empty() {
                return Err(SelectError::NoFirecracker);
            }
            Ok(Choice {
                driver: VmmDriver::Firecracker(firecracker(vmm)?),
                reason: "vmm.kind = \"firecracker\"".into(),
            })
        }
        VmmKind::Auto => {
            if vmm.firecracker_binary.as_os_str().is_empty() {
                return Ok(Choice {
                    driver: VmmDriver::Qemu(qemu()),
                    reason: "auto: no Firecracker binary configured".into(),
                });
            }
            let driver = firecracker(vmm)?;
            let cache = layout.kit();
            let kit = tokio::task::spawn_blocking(move || GuestKit::ensure(&kit, &cache))
                .await
                .map_err(|e| SelectError::Kit(e.to_string()))?
                .map_err(|e| SelectError::Kit(e.to_string()))?;
            let q = qemu();
            Ok(match q.accel_for(&kit).await {
                Accel::Kvm => Choice {
                    driver: VmmDriver::Firecracker(driver),
                    reason: format!("auto: KVM boots kernel {}", kit.kernel_version),
                },
                Accel::Tcg => Choice {
                    driver: VmmDriver::Qemu(q),
                    reason: format!(
                        "auto: KVM cannot boot kernel {} here; QEMU with software emulation",
                        kit.kernel_version
                    ),
                },
            })
        }
    }
}

/// The Firecracker driver the settings describe.
pub fn firecracker(vmm: &VmmConfig) -> Result<FirecrackerDriver, SelectError> {
    check_binary("vmm.firecracker_binary", &vmm.firecracker_binary)?;
    let mut driver = FirecrackerDriver::new(vmm.firecracker_binary.clone());
    if vmm.jailer.enabled {
        // The jailer execs Firecracker inside a jail with no loader or libraries: a
        // dynamically linked binary could never start there.
        let bytes = std::fs::read(&vmm.firecracker_binary).map_err(|e| SelectError::Binary {
            key: "vmm.firecracker_binary",
            path: vmm.firecracker_binary.clone(),
            reason: e.to_string(),
        })?;
        crate::elf::check_static(&bytes).map_err(|e| SelectError::Binary {
            key: "vmm.firecracker_binary",
            path: vmm.firecracker_binary.clone(),
            reason: format!(
                "{e}; the jailer runs Firecracker in a jail without a loader or libraries, \
                 so it must be statically linked (or set vmm.jailer.enabled = false)"
            ),
        })?;
        let binary = if vmm.jailer.binary.as_os_str().is_empty() {
            vmm.firecracker_binary
                .parent()
                .map(|d| d.join("jailer"))
                .unwrap_or_else(|| PathBuf::from("jailer"))
        } else {
            vmm.jailer.binary.clone()
        };
        check_binary("vmm.jailer.binary", &binary)?;
        if !matches!(vmm.jailer.cgroup_version, 1 | 2) {
            return Err(SelectError::Value {
                key: "vmm.jailer.cgroup_version",
                reason: format!("{} is not 1 or 2", vmm.jailer.cgroup_version),
            });
        }
        driver = driver.with_jailer(JailerSettings {
            binary,
            uid: vmm.jailer.uid,
            gid: vmm.jailer.gid,
            cgroups: vmm.jailer.cgroups.clone(),
            cgroup_version: vmm.jailer.cgroup_version,
            parent_cgroup: vmm.jailer.parent_cgroup.clone(),
            release_cgroup: false,
        });
    }
    Ok(driver)
}

/// A configured binary must be an executable file (a path, not looked up in `PATH`:
/// the jailer needs an absolute one anyway).
fn check_binary(key: &'static str, path: &Path) -> Result<(), SelectError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |reason: String| SelectError::Binary {
        key,
        path: path.to_path_buf(),
        reason,
    };
    if !path.is_absolute() {
        return Err(err("must be an absolute path".into()));
    }
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(err("not an executable file".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `choose` as the daemon calls it, on default directories and kit paths.
    async fn choose(vmm: &VmmConfig) -> Result<Choice, SelectError> {
        let layout = Layout::new("/nonexistent/data", "/nonexistent/cache");
        let kit = KitSource {
            kernel_dir: PathBuf::from("/nonexistent/kernel"),
            init_binary: PathBuf::from("/nonexistent/init"),
        };
        super::choose(vmm, &layout, kit).await
    }

    #[tokio::test]
    async fn qemu_and_auto_without_a_binary_choose_qemu() {
        let mut c = VmmConfig::default();
        let choice = choose(&c).await.unwrap();
        assert_eq!(choice.driver.describe(), "qemu");
        assert!(
            choice.reason.contains("no Firecracker"),
            "{}",
            choice.reason
        );
        c.kind = VmmKind::Qemu;
        assert_eq!(choose(&c).await.unwrap().driver.describe(), "qemu");
    }

    #[tokio::test]
    async fn firecracker_needs_an_executable_binary() {
        let mut c = VmmConfig {
            kind: VmmKind::Firecracker,
            ..VmmConfig::default()
        };
        let err = choose(&c).await.err().unwrap();
        assert!(err.to_string().contains("vmm.firecracker_binary"), "{err}");
        c.firecracker_binary = PathBuf::from("/nonexistent/firecracker");
        let err = choose(&c).await.err().unwrap();
        assert!(
            err.to_string().contains("/nonexistent/firecracker"),
            "{err}"
        );
        c.firecracker_binary = PathBuf::from("relative/firecracker");
        let err = choose(&c).await.err().unwrap();
        assert!(err.to_string().contains("absolute"), "{err}");
        // Jailed (the default), the binary must be static: a dynamic one is refused,
        // naming the key.
        c.firecracker_binary = PathBuf::from("/bin/true");
        let err = choose(&c).await.err().unwrap();
        assert!(err.to_string().contains("vmm.firecracker_binary"), "{err}");
        assert!(err.to_string().contains("dynamically linked"), "{err}");
        // Unjailed, any executable file passes (the binary is only run at launch).
        c.jailer.enabled = false;
        let choice = choose(&c).await.unwrap();
        assert_eq!(choice.driver.describe(), "firecracker");
        // A static binary (busybox-static, which install-deps installs) without a jailer
        // beside it: the jailer's key is named.
        c.jailer.enabled = true;
        c.firecracker_binary = PathBuf::from("/bin/busybox");
        let err = choose(&c).await.err().unwrap();
        assert!(err.to_string().contains("vmm.jailer.binary"), "{err}");
    }
}
