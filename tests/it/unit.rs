//! The shipped systemd unit: `systemd-analyze verify` accepts it and the offline security
//! review rates its exposure "OK" or better. The unit's binary paths are pointed at the built
//! binary in a scratch copy, since verify checks that they exist. The Debian package
//! (`[package.metadata.deb]` in Cargo.toml) installs the files where the unit looks for them;
//! building the package itself is too slow for CI, so only its description is checked here.

use std::path::{Path, PathBuf};
use std::process::Command;

use agentchatd::config::KeySource;

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

/// `[package.metadata.deb]` of Cargo.toml: each asset as (source, installed path), the folder
/// cargo-deb takes the systemd unit from, and what its maintainer scripts do with the unit.
struct DebPackage {
    assets: Vec<(String, String)>,
    unit_dir: PathBuf,
    enables_on_install: bool,
    starts_on_install: bool,
}

impl DebPackage {
    fn from_manifest(root: &Path) -> DebPackage {
        let text = std::fs::read_to_string(root.join("Cargo.toml")).expect("Cargo.toml");
        let manifest: toml::Table = text.parse().expect("Cargo.toml is TOML");
        let deb = &manifest["package"]["metadata"]["deb"];
        let assets = deb["assets"]
            .as_array()
            .expect("an explicit asset list")
            .iter()
            .map(|asset| {
                let field = |n: usize| asset[n].as_str().expect("[source, dest, mode]").to_owned();
                let (source, dest) = (field(0), field(1));
                // cargo-deb: a destination ending in `/` is a folder that keeps the file's name.
                let installed = match dest.strip_suffix('/') {
                    Some(dir) => {
                        let name = Path::new(&source).file_name().expect("a file name");
                        format!("/{dir}/{}", name.to_string_lossy())
                    }
                    None => format!("/{dest}"),
                };
                (source, installed)
            })
            .collect();
        let units = &deb["systemd-units"];
        let unit_dir = units["unit-scripts"].as_str().expect("unit-scripts");
        // cargo-deb enables and starts units unless told otherwise.
        let flag = |key: &str| units.get(key).is_none_or(|v| v.as_bool() != Some(false));
        DebPackage {
            assets,
            unit_dir: root.join(unit_dir),
            enables_on_install: flag("enable"),
            starts_on_install: flag("start"),
        }
    }

    /// The source of the asset installed at `path`.
    fn source_of(&self, path: &str) -> Option<&str> {
        self.assets.iter().find(|(_, installed)| installed == path).map(|(s, _)| s.as_str())
    }
}

/// Every value of `key=` in the unit, in order.
fn unit_values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    let prefix = format!("{key}=");
    unit.lines().filter_map(|line| line.strip_prefix(&prefix)).collect()
}

#[test]
fn the_deb_package_installs_what_the_unit_expects() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let package = DebPackage::from_manifest(root);

    // Each asset is a file in the repository, or the release build of this crate's binary.
    let binary_name = Path::new(env!("CARGO_BIN_EXE_agentchatd")).file_name().expect("name");
    for (source, _) in &package.assets {
        match source.strip_prefix("target/release/") {
            Some(built) => assert_eq!(Some(built), binary_name.to_str(), "{source}"),
            None => assert!(root.join(source).is_file(), "asset {source} is not in the repository"),
        }
    }
    // cargo-deb installs the unit from `unit-scripts` (that is the file tested above); listing
    // it as an asset as well would package it twice.
    let unit_path = package.unit_dir.join("agentchatd.service");
    assert_eq!(unit_path, root.join("systemd/agentchatd.service"));
    assert!(package.assets.iter().all(|(source, _)| !source.ends_with(".service")));
    let unit = std::fs::read_to_string(&unit_path).expect("unit file");
    // Without the operator's key the service cannot start, so installing must not try.
    assert!(!package.enables_on_install && !package.starts_on_install);

    // ExecStartPre= and ExecStart= run the packaged binary on the packaged config.
    let commands = [unit_values(&unit, "ExecStartPre"), unit_values(&unit, "ExecStart")].concat();
    assert_eq!(commands.len(), 2, "one check and one start: {commands:?}");
    let mut config_paths = Vec::new();
    for command in &commands {
        let words: Vec<&str> = command.split_whitespace().collect();
        assert_eq!(package.source_of(words[0]), Some("target/release/agentchatd"), "{command}");
        let config = words.windows(2).find(|w| w[0] == "--config").map(|w| w[1]);
        config_paths.push(config.unwrap_or_else(|| panic!("no --config in {command}")));
    }
    assert_eq!(config_paths[0], config_paths[1]);
    let config_path = config_paths[0];
    // cargo-deb marks files under /etc as conffiles, so dpkg keeps an operator's edits.
    assert!(config_path.starts_with("/etc/"), "{config_path}");
    let source = package.source_of(config_path).expect("the config is packaged");

    // The packaged config reads the key where LoadCredential= puts it and keeps its state in
    // the StateDirectory=.
    let text = std::fs::read_to_string(root.join(source)).expect("packaged config");
    let config = agentchatd::config::parse(&text, Path::new(config_path)).expect("valid config");
    let credential = unit_values(&unit, "LoadCredential");
    let credential = credential.first().and_then(|c| c.split(':').next()).expect("a credential");
    let key_path = PathBuf::from(format!("/run/credentials/agentchatd.service/{credential}"));
    assert_eq!(config.api_key, KeySource::File(key_path));
    let state_dir = unit_values(&unit, "StateDirectory");
    let state_dir = format!("/var/lib/{}", state_dir.first().expect("a StateDirectory="));
    assert_eq!(config.state_dir, PathBuf::from(state_dir));
}
