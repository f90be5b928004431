//! `kiln-firstboot stage` (issue 8, baked images): it fills the verified cache with every pinned
//! artifact through the daemon's one download path, and a node whose cache was staged runs
//! every step without a single request to the network (here: the loopback mirror, whose files
//! are removed after staging so any request would 404 and be logged).

mod steps_common;

use kiln_plan::manifests;
use std::fs;
use std::process::{Command, Output};
use steps_common::*;

fn stage(node: &TestNode) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln-firstboot"))
        .args(["stage", "--root"])
        .arg(&node.root)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

const KEYS: [&str; 4] = ["k3s", "k3s-checksums", "tailscale", "argocd"];

#[test]
fn staged_cache_lets_every_step_run_with_the_network_gone() {
    let mirror_dir = std::cell::RefCell::new(None);
    let (node, mirror, pins, _plan) = setup(|_, dir| {
        *mirror_dir.borrow_mut() = Some(dir.to_path_buf());
    });
    let mirror_dir = mirror_dir.into_inner().unwrap();

    let out = stage(&node);
    let all = text(&out);
    assert!(out.status.success(), "stage failed:\n{all}");
    for key in ["k3s", "tailscale", "argocd"] {
        let sha = pins[key]["sha256"].as_str().unwrap();
        let cached = node.p(&format!("/var/lib/kiln/cache/{sha}"));
        assert!(cached.is_file(), "{key} not staged");
        assert_eq!(
            kiln_plan::Sha256::digest(&fs::read(&cached).unwrap()).to_hex(),
            sha
        );
        assert!(
            all.contains(&format!("sha256 {sha}")) && all.contains("(fetched)"),
            "{all}"
        );
        assert_eq!(mirror.hits(pins[key]["path"].as_str().unwrap()), 1, "{key}");
    }
    // The K3s pin was cross-checked against the release's checksum file while staging.
    assert_eq!(
        mirror.hits(pins["k3s-checksums"]["path"].as_str().unwrap()),
        1
    );
    // Staging installs and starts nothing.
    assert!(!node.p("/usr/local/bin/k3s").exists());
    assert!(!node.p("/var/lib/kiln/journal.json").exists());
    assert!(
        node.log().is_empty(),
        "stage ran programs: {:?}",
        node.log()
    );

    // Staging again finds everything cached and asks the network for nothing.
    let before = mirror.requests().len();
    let out = stage(&node);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(text(&out).matches("(cached)").count(), 3, "{}", text(&out));
    assert_eq!(mirror.requests().len(), before);

    // The network is gone: every file leaves the mirror, so any download would 404.
    for key in KEYS {
        fs::remove_file(mirror_dir.join(pins[key]["path"].as_str().unwrap())).unwrap();
    }
    let out = node.run_daemon();
    assert!(out.status.success(), "daemon failed:\n{}", text(&out));
    let states = step_states(&status(&node.root));
    assert_eq!(states.len(), 6, "{states:?}");
    // Every installing step really ran (nothing was installed yet); verify only checks.
    assert!(
        states[..5].iter().all(|s| s.1 == "done")
            && matches!(states[5].1.as_str(), "done" | "skipped"),
        "{states:?}"
    );
    assert_eq!(
        mirror.requests().len(),
        before,
        "the daemon downloaded: {:?}",
        &mirror.requests()[before..]
    );
    assert!(node.p("/usr/local/bin/k3s").is_file());
}

#[test]
fn stage_refuses_a_corrupted_artifact_and_names_it() {
    let (node, mirror, pins, _plan) = setup(|_, dir| {
        let p = dir.join("tailscale/tailscale_1.102.3_amd64.tgz");
        let mut b = fs::read(&p).unwrap();
        b[100] ^= 0xff;
        fs::write(&p, b).unwrap();
    });
    let out = stage(&node);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(
        all.contains("kiln-stage: FAILED")
            && all.contains("tailscale_1.102.3_amd64.tgz")
            && all.contains("sha256 mismatch"),
        "{all}"
    );
    let ts = pins["tailscale"]["sha256"].as_str().unwrap();
    assert!(!node.p(&format!("/var/lib/kiln/cache/{ts}")).exists());
    // K3s came before it and stays staged.
    let k3s = pins["k3s"]["sha256"].as_str().unwrap();
    assert!(node.p(&format!("/var/lib/kiln/cache/{k3s}")).is_file());
    assert!(mirror.hits(pins["tailscale"]["path"].as_str().unwrap()) >= 1);
}

#[test]
fn stage_without_a_plan_fails_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kiln-firstboot"))
        .args(["stage", "--root"])
        .arg(tmp.path())
        .output()
        .unwrap();
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(
        all.contains("kiln-stage: FAILED") && all.contains("etc/kiln/plan.json"),
        "{all}"
    );
}

#[test]
fn an_air_gapped_plan_is_staged_from_the_network_and_then_runs_without_it() {
    let mirror_dir = std::cell::RefCell::new(None);
    let (node, mirror, pins, plan) = setup(|plan, dir| {
        plan.artifacts.air_gap = true;
        *mirror_dir.borrow_mut() = Some(dir.to_path_buf());
    });
    assert!(plan.artifacts.air_gap);
    let out = stage(&node);
    assert!(out.status.success(), "{}", text(&out));
    for key in ["k3s", "tailscale", "argocd"] {
        assert_eq!(mirror.hits(pins[key]["path"].as_str().unwrap()), 1, "{key}");
    }
    let before = mirror.requests().len();
    let out = node.run_daemon();
    assert!(out.status.success(), "daemon failed:\n{}", text(&out));
    assert_eq!(mirror.requests().len(), before, "air-gapped run downloaded");
}

/// A pinned operator chart archive and a K3s image archive (issue 8: charts and image
/// tarballs pre-staged): staged with the rest, then installed from the cache where K3s uses
/// them (static charts dir, agent images dir) with the network gone; the HelmChart points at
/// the K3s-served archive, not at the chart repository.
#[test]
fn a_pinned_chart_archive_and_image_archives_are_staged_and_installed_offline() {
    const CHART: &str = "tailscale-operator-1.102.3.tgz";
    const IMAGES: &str = "kiln-test-images.tar.zst";
    let chart_bytes =
        b"chart archive bytes (a contract stand-in: K3s only serves the file)".to_vec();
    let image_bytes =
        b"image archive bytes (a contract stand-in: K3s imports it at start)".to_vec();
    let mirror_dir = std::cell::RefCell::new(None);
    let (node, mirror, _pins, plan) = setup(|plan, dir| {
        fs::write(dir.join("tailscale").join(CHART), &chart_bytes).unwrap();
        fs::create_dir_all(dir.join("images")).unwrap();
        fs::write(dir.join("images").join(IMAGES), &image_bytes).unwrap();
        let base = plan.tailscale.tarball.url.clone();
        plan.tailscale.operator.as_mut().unwrap().chart_archive = Some(kiln_plan::Artifact {
            name: CHART.into(),
            url: base.join(CHART).unwrap(),
            pin: kiln_plan::Pin::new(kiln_plan::Sha256::digest(&chart_bytes), None),
        });
        plan.k3s.images = vec![kiln_plan::Artifact {
            name: IMAGES.into(),
            url: base.join(&format!("../images/{IMAGES}")).unwrap(),
            pin: kiln_plan::Pin::new(
                kiln_plan::Sha512::digest(&image_bytes),
                Some(image_bytes.len() as u64),
            ),
        }];
        pin_manifests(plan);
        *mirror_dir.borrow_mut() = Some(dir.to_path_buf());
    });
    let mirror_dir = mirror_dir.into_inner().unwrap();
    let chart_url_path = format!("tailscale/{CHART}");
    let image_url_path = format!("images/{IMAGES}");

    let out = stage(&node);
    assert!(out.status.success(), "stage failed:\n{}", text(&out));
    assert_eq!(mirror.hits(&chart_url_path), 1);
    assert_eq!(mirror.hits(&image_url_path), 1);
    fs::remove_file(mirror_dir.join(&chart_url_path)).unwrap();
    fs::remove_file(mirror_dir.join(&image_url_path)).unwrap();
    let before = mirror.requests().len();

    let out = node.run_daemon();
    assert!(out.status.success(), "daemon failed:\n{}", text(&out));
    assert_eq!(
        mirror.requests()[before..]
            .iter()
            .filter(|r| r.path.contains(CHART) || r.path.contains(IMAGES))
            .count(),
        0
    );
    let chart = node.p(&format!(
        "/var/lib/rancher/k3s/server/static/charts/{CHART}"
    ));
    let image = node.p(&format!("/var/lib/rancher/k3s/agent/images/{IMAGES}"));
    assert_eq!(fs::read(&chart).unwrap(), chart_bytes);
    assert_eq!(fs::read(&image).unwrap(), image_bytes);
    let helmchart = manifests::tailscale_operator_chart(&plan);
    assert_eq!(
        helmchart.spec.chart.as_deref(),
        Some(format!("https://%{{KUBERNETES_API}}%/static/charts/{CHART}").as_str())
    );
    assert!(helmchart.spec.repo.is_none() && helmchart.spec.version.is_none());
    let installed =
        fs::read_to_string(node.p("/var/lib/rancher/k3s/server/manifests/tailscale-operator.yaml"))
            .unwrap_or_default();
    assert!(
        installed.contains(&format!("static/charts/{CHART}")),
        "the installed HelmChart must point at the served archive: {installed}"
    );

    // A re-run finds both in place and skips every step.
    let out = node.run_daemon();
    assert!(out.status.success(), "{}", text(&out));
    let states = step_states(&status(&node.root));
    assert!(states.iter().all(|s| s.1 == "skipped"), "{states:?}");
}
