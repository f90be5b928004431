//! The Terraform `kiln azure terraform` emits (examples/terraform verbatim + tfvars) matches the
//! node architecture: Ubuntu 22.04 gen2, Standard_B2as_v2, custom_data via filebase64, private
//! VNet with NAT egress, no public IP on the VM, optional managed identity.

use kiln::publish::terraform::{self, Vars, FILES};
use std::process::Command;

fn main_tf() -> &'static str {
    FILES.iter().find(|(n, _)| *n == "main.tf").unwrap().1
}

/// Strips comments so assertions see only configuration.
fn code(tf: &str) -> String {
    tf.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

fn block<'a>(tf: &'a str, header: &str) -> &'a str {
    let start = tf.find(header).unwrap_or_else(|| panic!("no {header}"));
    let rest = &tf[start..];
    let end = rest.find("\n}\n").unwrap_or(rest.len());
    &rest[..end]
}

#[test]
fn vm_uses_the_jammy_gen2_image_the_b2as_v2_size_and_gzip_custom_data() {
    let tf = code(main_tf());
    let vm = block(&tf, "resource \"azurerm_linux_virtual_machine\" \"node\"");
    for needle in [
        "publisher = \"Canonical\"",
        "offer     = \"0001-com-ubuntu-server-jammy\"",
        "sku       = \"22_04-lts-gen2\"",
        "version   = \"latest\"",
        "custom_data = filebase64(var.custom_data_path)",
        "disable_password_authentication = true",
        "identity_ids = [azurerm_user_assigned_identity.node.id]",
        "depends_on = [azurerm_role_assignment.node_secrets_user]",
    ] {
        assert!(vm.contains(needle), "VM block lacks {needle:?}");
    }
    assert!(FILES[1].1.contains("default     = \"Standard_B2as_v2\""));
}

#[test]
fn the_vm_has_no_public_ip_and_lives_on_a_private_subnet_with_nat_egress() {
    let tf = code(main_tf());
    let nic = block(&tf, "resource \"azurerm_network_interface\" \"node\"");
    assert!(!nic.contains("public_ip_address_id"), "{nic}");
    assert!(tf.contains("default_outbound_access_enabled = false"));
    assert!(tf.contains("resource \"azurerm_subnet_nat_gateway_association\""));
    let nsg = block(&tf, "resource \"azurerm_network_security_group\" \"nodes\"");
    assert!(!nsg.contains("security_rule"), "no inbound rules: {nsg}");
    // The only public IP in the configuration is the NAT gateway's.
    assert_eq!(tf.matches("resource \"azurerm_public_ip\"").count(), 1);
    assert!(tf.contains("public_ip_address_id = azurerm_public_ip.nat.id"));
}

#[test]
fn written_directory_holds_the_example_and_tfvars_and_is_terraform_formatted() {
    let dir = tempfile::tempdir().unwrap();
    let vars = Vars {
        name: "ameciclo".into(),
        computer_name: "ameciclo".into(),
        admin_username: "kiln".into(),
        admin_ssh_public_keys: vec!["ssh-ed25519 AAAA\"quoted\" kiln@example".into()],
        custom_data_path: "../out/custom_data.gz".into(),
        managed_identity: true,
        bundle_storage_account: Some("kilnbundles".into()),
        bundle_container: Some("kiln".into()),
    };
    let written = terraform::write(dir.path(), &vars).unwrap();
    assert_eq!(written.len(), FILES.len() + 1);
    for (name, text) in FILES {
        let on_disk = std::fs::read_to_string(dir.path().join(name)).unwrap();
        let example = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../examples/terraform")
                .join(name),
        )
        .unwrap();
        assert_eq!(on_disk, text);
        assert_eq!(on_disk, example, "{name} drifted from examples/terraform");
    }
    let tfvars: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join(terraform::TFVARS)).unwrap())
            .unwrap();
    assert_eq!(
        tfvars["admin_ssh_public_keys"][0],
        "ssh-ed25519 AAAA\"quoted\" kiln@example"
    );
    assert_eq!(tfvars["managed_identity"], true);

    // `terraform fmt` parses HCL: a syntax error fails it. (Validation against the azurerm schema
    // needs the provider, which cannot be downloaded here.)
    match Command::new("terraform")
        .args(["fmt", "-check", "-no-color"])
        .arg(dir.path())
        .output()
    {
        Ok(o) => assert!(
            o.status.success(),
            "terraform fmt -check: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(_) => eprintln!("SKIPPED terraform fmt -check: terraform not installed"),
    }
}

#[test]
fn reference_profile_fills_the_tfvars_hostname_admin_and_keys() {
    let profile =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiles/ameciclo.yaml");
    let dir = tempfile::tempdir().unwrap();
    let args = kiln::publish::TerraformArgs {
        profile,
        out: dir.path().join("tf"),
        custom_data: "out/custom_data.gz".into(),
        managed_identity: false,
        account: None,
        container: None,
    };
    let vars = kiln::publish::terraform_vars(&args, &kiln::resolve::process_env)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(vars.computer_name, "ameciclo-k3s");
    assert_eq!(vars.admin_username, "ameciclo");
    assert_eq!(vars.admin_ssh_public_keys.len(), 1);
    terraform::write(&args.out, &vars).unwrap();
    assert!(args.out.join("kiln.auto.tfvars.json").is_file());
}

#[test]
fn key_vault_is_rbac_and_only_the_nodes_identity_reads_its_secrets() {
    let kv = code(FILES.iter().find(|(n, _)| *n == "keyvault.tf").unwrap().1);
    let vault = block(&kv, "resource \"azurerm_key_vault\" \"kiln\"");
    assert!(
        vault.contains("enable_rbac_authorization  = true"),
        "{vault}"
    );
    assert!(
        !kv.contains("access_policy"),
        "RBAC mode has no access policies"
    );
    let reader = block(
        &kv,
        "resource \"azurerm_role_assignment\" \"node_secrets_user\"",
    );
    assert!(reader.contains("role_definition_name = \"Key Vault Secrets User\""));
    assert!(
        reader.contains("principal_id         = azurerm_user_assigned_identity.node.principal_id")
    );
    assert!(kv.contains("resource \"azurerm_user_assigned_identity\" \"node\""));
    assert!(kv.contains("output \"identity_client_id\""));
    // Secret values never go through Terraform (its state would hold them).
    assert!(!kv.contains("azurerm_key_vault_secret"));
}
