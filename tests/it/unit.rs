//! The shipped systemd unit: `systemd-analyze verify` accepts it and the offline security
//! review rates its exposure "OK" or better. The unit's binary paths are pointed at the built
//! binary in a scratch copy, since verify checks that they exist.

use std::process::Command;

#[test]
fn the_systemd_unit_verifies_and_is_rated_ok_or_better() {
    let analyze = "systemd-analyze";
    assert!(
        Command::new(analyze).arg("--version").output().is_ok_and(|o| o.status.success()),
        "systemd-analyze is needed for this test (Debian package `systemd`; .ci/run installs it)"
    );
    let unit =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/agentchatd.service"))
            .expect("unit file");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agentchatd.service");
    std::fs::write(&path, unit.replace("/usr/bin/agentchatd", env!("CARGO_BIN_EXE_agentchatd")))
        .expect("write unit");

    let verify = Command::new(analyze).arg("verify").arg(&path).output().expect("verify runs");
    let complaints = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success() && complaints.trim().is_empty(), "{complaints}");

    let security = Command::new(analyze)
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&path)
        .output()
        .expect("security runs");
    let report = String::from_utf8_lossy(&security.stdout);
    let verdict = report.lines().find(|l| l.contains("Overall exposure level")).unwrap_or("");
    let score: f64 = verdict
        .split("agentchatd.service:")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(10.0);
    assert!(score <= 3.9, "exposure {score} is worse than OK: {verdict}");
}
