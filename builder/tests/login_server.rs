//! `tailscale.login-server` (a self-hosted control server such as Headscale): it reaches the
//! plan as given, and the combination Headscale refuses at join time (advertised tags with a
//! pre-auth key) is a build warning. The refusals (with `tailscale.api`, a non-http URL) are in
//! the bad-profile corpus (tests/profiles/bad/tailscale-login-server-*.yaml).

mod common;

use kiln::pipeline;

fn build(extra: &str) -> kiln::resolve::Resolved {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p.yaml");
    std::fs::write(
        &p,
        format!(
            "extends: {}\n{extra}",
            common::repo()
                .join("tests/profiles/good/base.yaml")
                .display()
        ),
    )
    .unwrap();
    let daemon = kiln::elf::tiny_static_elf();
    match pipeline::build(&p, &daemon, 0, &common::no_env) {
        Ok((resolved, _)) => resolved,
        Err(e) => panic!("{e:?}"),
    }
}

#[test]
fn login_server_reaches_the_plan_and_tags_with_it_warn() {
    let r = build("tailscale:\n  login-server: https://headscale.example.org\n");
    assert_eq!(
        r.plan.tailscale.login_server.as_ref().map(|u| u.as_str()),
        Some("https://headscale.example.org/")
    );
    assert!(r.warnings.iter().all(|w| !w.contains("login-server")));

    let r = build("tailscale:\n  login-server: https://headscale.example.org\n  tags: [tag:k8s]\n");
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains("refuses --advertise-tags")),
        "{:?}",
        r.warnings
    );

    // Without it the plan names no control server (Tailscale's own).
    assert!(build("").plan.tailscale.login_server.is_none());
}
