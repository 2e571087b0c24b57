//! The built-in demo image: made by hearth from the host's static busybox (Debian package
//! busybox-static), so the first machine boots with no registry. It serves a page on
//! port 80.

use std::io;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

/// The demo's default workload: busybox's web server in the foreground.
pub const COMMAND: [&str; 7] = ["/bin/busybox", "httpd", "-f", "-p", "80", "-h", "/srv/www"];

/// The page the demo serves.
pub const PAGE: &str = "hearth demo\n";

const APPLETS: [&str; 14] = [
    "sh", "ls", "cat", "httpd", "nc", "ip", "ps", "mount", "echo", "sleep", "wget", "true",
    "false", "env",
];

/// Writes the demo root filesystem into `dir` (which must be empty or missing).
pub fn build(dir: &Path, busybox: &Path) -> io::Result<()> {
    let binary = std::fs::read(busybox).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("demo image needs {}: {e}", busybox.display()),
        )
    })?;
    if has_interpreter(&binary) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is dynamically linked; the demo needs busybox-static",
                busybox.display()
            ),
        ));
    }
    for sub in [
        "bin", "srv/www", "proc", "sys", "dev", "tmp", "run", "var/log", "etc",
    ] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    let target = dir.join("bin/busybox");
    std::fs::write(&target, &binary)?;
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))?;
    for applet in APPLETS {
        symlink("busybox", dir.join("bin").join(applet))?;
    }
    std::fs::write(dir.join("srv/www/index.html"), PAGE)?;
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n")?;
    std::fs::write(dir.join("etc/group"), "root:x:0:\n")?;
    std::fs::set_permissions(dir.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
    Ok(())
}

/// True when an ELF file asks for a dynamic loader (has a PT_INTERP program header).
fn has_interpreter(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let read = |at: usize, len: usize| elf.get(at..at + len);
    let (Some(phoff), Some(entsize), Some(count)) = (read(0x20, 8), read(0x36, 2), read(0x38, 2))
    else {
        return false;
    };
    let phoff = u64::from_le_bytes(phoff.try_into().unwrap_or([0; 8])) as usize;
    let entsize = u16::from_le_bytes(entsize.try_into().unwrap_or([0; 2])) as usize;
    let count = u16::from_le_bytes(count.try_into().unwrap_or([0; 2])) as usize;
    (0..count).any(|i| {
        read(phoff + i * entsize, 4)
            .is_some_and(|t| u32::from_le_bytes(t.try_into().unwrap_or([0; 4])) == PT_INTERP)
    })
}
