//! `deploy/hearthd.service` is a unit systemd accepts as written (`systemd-analyze
//! verify` prints nothing for it: it exits 0 even for unknown keys, so its words are
//! what is checked), and it keeps the two settings hearth relies on: VMMs outlive the
//! daemon (`KillMode=process`) and hearthd owns its cgroups (`Delegate=yes`).

mod support;

use std::path::Path;
use std::process::Command;

#[test]
fn the_unit_verifies_and_lets_vmms_outlive_the_daemon() {
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/hearthd.service"),
    )
    .expect("read the unit");
    let lines: Vec<&str> = unit.lines().map(str::trim).collect();
    for needed in ["KillMode=process", "Delegate=yes", "Restart=on-failure"] {
        assert!(lines.contains(&needed), "{needed} missing from the unit");
    }
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        support::skipped(
            "systemd_unit (verify)",
            "no systemd-analyze on this host (Debian's systemd package)",
        );
        return;
    }
    // verify wants ExecStart's binary to exist: point it at the one just built.
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("hearthd.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/local/bin/hearthd", env!("CARGO_BIN_EXE_hearthd")),
    )
    .expect("write the copy");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("run systemd-analyze");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let about_ours: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("hearthd.service"))
        .collect();
    assert!(out.status.success(), "{said}");
    assert!(about_ours.is_empty(), "systemd-analyze on the unit: {said}");
}
