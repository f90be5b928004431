//! All six steps run by the real `kiln-firstboot run --root` against the contract stand-ins,
//! installed from a loopback artifact mirror through the production download path; then a
//! second run finds every step in place and changes nothing.

mod steps_common;

use kiln_plan::manifests;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use steps_common::*;

#[test]
fn six_steps_against_the_standins_then_a_rerun_changes_nothing() {
    let (node, mirror, pins, plan) = setup(|_, _| {});
    let root = node.root.clone();

    // ---- first run: everything is applied -----------------------------------------------
    let out = node.run_daemon();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "first run failed ({}):\n{stdout}\n{stderr}\n--- k3s log:\n{}",
        out.status,
        fs::read_to_string(node.p("/var/log/standin-systemd/k3s.service.log")).unwrap_or_default()
    );
    let st = status(&root);
    let states = step_states(&st);
    assert_eq!(
        states.iter().map(|s| s.0.as_str()).collect::<Vec<_>>(),
        [
            "k3s",
            "tailscale",
            "tailscale-operator",
            "argocd",
            "gitops",
            "verify"
        ],
        "{st}"
    );
    // The first five had to apply; verify only reads the cluster back, so its check may
    // already pass (the stand-in applies manifests at once) and it is then "skipped".
    assert!(states[..5].iter().all(|s| s.1 == "done"), "{states:?}");
    assert!(
        matches!(states[5].1.as_str(), "done" | "skipped"),
        "{states:?}"
    );

    // Downloads went through the mirror (the production path), each artifact once.
    for key in ["k3s", "k3s-checksums", "tailscale", "argocd"] {
        let path = pins[key]["path"].as_str().unwrap();
        assert_eq!(
            mirror.hits(path),
            1,
            "{path} should be fetched exactly once"
        );
    }

    // K3s: binary from the pin, 0755; config, unit, env file as install.sh writes them.
    let k3s = fs::metadata(node.p("/usr/local/bin/k3s")).unwrap();
    assert_eq!(k3s.mode() & 0o7777, 0o755);
    assert!(plan.k3s.binary.pin.matches(&kiln_plan::Hashes::of(
        &fs::read(node.p("/usr/local/bin/k3s")).unwrap()
    )));
    let config = fs::read(node.p("/etc/rancher/k3s/config.yaml")).unwrap();
    golden("config.yaml", &config);
    assert_eq!(
        fs::read_to_string(node.p("/etc/systemd/system/k3s.service")).unwrap(),
        kiln_firstboot::k3s::unit_text()
    );
    let env = fs::metadata(node.p("/etc/systemd/system/k3s.service.env")).unwrap();
    assert_eq!(env.mode() & 0o777, 0o600);
    for l in ["kubectl", "crictl", "ctr"] {
        assert_eq!(
            fs::read_link(node.p(&format!("/usr/local/bin/{l}"))).unwrap(),
            Path::new("k3s")
        );
    }
    assert!(node
        .p("/etc/systemd/system/multi-user.target.wants/k3s.service")
        .is_symlink());
    assert!(node
        .p("/etc/systemd/system/multi-user.target.wants/tailscaled.service")
        .is_symlink());

    // Tailscale: the package layout, joined with exactly the planned arguments, key removed.
    for (p, mode) in [
        ("/usr/bin/tailscale", 0o755),
        ("/usr/sbin/tailscaled", 0o755),
        ("/lib/systemd/system/tailscaled.service", 0o644),
        ("/etc/default/tailscaled", 0o644),
    ] {
        assert_eq!(
            fs::metadata(node.p(p)).unwrap().mode() & 0o7777,
            mode,
            "{p}"
        );
    }
    let log = node.log();
    let ups: Vec<_> = argv_of(&log, "tailscale")
        .into_iter()
        .filter(|a| a.first().map(String::as_str) == Some("up"))
        .collect();
    assert_eq!(
        ups,
        [vec![
            "up",
            "--auth-key",
            "file:/etc/kiln/secrets/tailscale-auth-key",
            "--hostname",
            "ameciclo",
            "--advertise-tags",
            "tag:k8s"
        ]]
    );
    assert!(
        !node.p(AUTH_KEY_FILE).exists(),
        "the auth key must be removed once Running"
    );
    // K3s started once, then restarted once when the tailnet name joined tls-san.
    let servers = argv_of(&log, "k3s")
        .into_iter()
        .filter(|a| a[0] == "server")
        .count();
    assert_eq!(
        servers, 2,
        "k3s server starts: first start + tls-san restart"
    );
    let config_text = String::from_utf8_lossy(&config);
    assert!(
        config_text.contains("ameciclo.tail0000.ts.net"),
        "{config_text}"
    );
    let facts = st.to_string();
    assert!(
        facts.contains("ameciclo.tail0000.ts.net"),
        "facts should name the node: {st}"
    );

    // Manifests: bundled ones byte-identical to the bundle, node-rendered ones golden, 0600.
    let mdir = node.p("/var/lib/rancher/k3s/server/manifests");
    for m in manifests::bundled(&plan) {
        assert_eq!(fs::read(mdir.join(&m.file)).unwrap(), m.bytes, "{}", m.file);
    }
    for f in [manifests::TAILSCALE_OAUTH_FILE, manifests::GITOPS_REPO_FILE] {
        let meta = fs::metadata(mdir.join(f)).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600, "{f}");
        golden(f, &fs::read(mdir.join(f)).unwrap());
    }
    let argocd = fs::read(mdir.join(manifests::ARGOCD_INSTALL_FILE)).unwrap();
    golden(
        "argocd.yaml.sha256",
        format!("{}\n", kiln_plan::Sha256::digest(&argocd).to_hex()).as_bytes(),
    );
    // No temp files left where K3s looks.
    let mut names: Vec<String> = fs::read_dir(&mdir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "argocd-ingress.yaml",
            "argocd.yaml",
            "gitops-repo.yaml",
            "gitops-root.yaml",
            "tailscale-operator-oauth.yaml",
            "tailscale-operator.yaml"
        ]
    );

    // Secret values appear nowhere but in the 0600 files that must hold them.
    let canaries = [AUTH_KEY, OAUTH_SECRET, REPO_PASSWORD];
    for text in [stdout.as_ref(), stderr.as_ref()] {
        for c in canaries {
            assert!(!text.contains(c), "secret leaked to daemon output");
        }
    }
    for (rel, (_, _, mode, _)) in snapshot(&root) {
        let p = root.join(&rel);
        if fs::symlink_metadata(&p).unwrap().is_symlink() || mode & 0o004 == 0 {
            continue;
        }
        let data = fs::read(&p).unwrap();
        let text = String::from_utf8_lossy(&data);
        for c in canaries {
            assert!(!text.contains(c), "{rel} (world-readable) holds a secret");
        }
    }
    for rel in ["var/log/kiln-standins.log", "run/kiln/status.json"] {
        let text = fs::read_to_string(root.join(rel)).unwrap_or_default();
        for c in canaries {
            assert!(!text.contains(c), "{rel} holds a secret");
        }
    }

    // Argo CD's view of the root Application is recorded as information.
    assert!(facts.contains("argocd.root.sync"), "{st}");

    // ---- second run: every step skipped by check, nothing rewritten -----------------------
    let before = snapshot(&root);
    let log_len = node.log().len();
    let out = node.run_daemon();
    assert!(
        out.status.success(),
        "second run failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let states = step_states(&status(&root));
    assert!(
        states.iter().all(|s| s.1 == "skipped"),
        "every step should be skipped by its check: {states:?}"
    );
    let after = snapshot(&root);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    for (k, v) in &before {
        assert_eq!(v, &after[k], "{k} was rewritten by the second run");
    }
    let new = node.log()[log_len..].to_vec();
    for e in &new {
        let argv: Vec<&str> = e["argv"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let prog = e["prog"].as_str().unwrap();
        let changes = match prog {
            "systemctl" => !matches!(argv.first(), Some(&"is-active") | Some(&"is-enabled")),
            "tailscale" => argv.first() != Some(&"status"),
            "k3s" => argv.first() != Some(&"kubectl"),
            _ => true,
        };
        assert!(!changes, "second run changed state: {prog} {argv:?}");
    }
    for key in ["k3s", "tailscale", "argocd"] {
        let path = pins[key]["path"].as_str().unwrap();
        assert_eq!(mirror.hits(path), 1, "{path} was downloaded again");
    }
}
