//! `kiln azure terraform`: the Terraform for one node, from the checked-in example.
//!
//! The `.tf` files are `examples/terraform/` verbatim (so the documented example and the command's
//! output cannot drift); the command adds `kiln.auto.tfvars.json` with the values taken from the
//! profile and the publish output. JSON tfvars need no HCL escaping.

use anyhow::{bail, Context as _, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

pub const FILES: [(&str, &str); 4] = [
    (
        "main.tf",
        include_str!("../../../examples/terraform/main.tf"),
    ),
    (
        "variables.tf",
        include_str!("../../../examples/terraform/variables.tf"),
    ),
    (
        "outputs.tf",
        include_str!("../../../examples/terraform/outputs.tf"),
    ),
    (
        "keyvault.tf",
        include_str!("../../../examples/terraform/keyvault.tf"),
    ),
];

pub const TFVARS: &str = "kiln.auto.tfvars.json";

/// Values for `variables.tf` that kiln knows; everything else keeps the example's defaults.
#[derive(Debug, Clone, Serialize)]
pub struct Vars {
    pub name: String,
    pub computer_name: String,
    pub admin_username: String,
    pub admin_ssh_public_keys: Vec<String>,
    pub custom_data_path: String,
    pub managed_identity: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bundle_storage_account: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bundle_container: Option<String>,
}

impl Vars {
    pub fn validate(&self) -> Result<()> {
        // Azure: Linux computer names are 1-64 chars of letters, digits and '-'.
        let host_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 64
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !s.starts_with('-')
        };
        if !host_ok(&self.name) {
            bail!("VM name {:?} is not a valid Azure Linux VM name", self.name);
        }
        if !host_ok(&self.computer_name) {
            bail!(
                "hostname {:?} is not a valid Azure computer name",
                self.computer_name
            );
        }
        if self.admin_ssh_public_keys.is_empty() {
            bail!("the profile has no SSH public key for the admin user; Azure requires one (password login is disabled)");
        }
        if self.managed_identity && self.bundle_storage_account.is_none() {
            bail!("managed identity needs the bundle storage account (--account)");
        }
        Ok(())
    }

    pub fn to_json(&self) -> Result<String> {
        let mut s = serde_json::to_string_pretty(self).context("encoding tfvars")?;
        s.push('\n');
        Ok(s)
    }
}

/// Writes the `.tf` files and the tfvars into `dir`; returns the paths written.
pub fn write(dir: &Path, vars: &Vars) -> Result<Vec<PathBuf>> {
    vars.validate()?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    let tfvars = vars.to_json()?;
    for (name, text) in FILES.iter().copied().chain([(TFVARS, tfvars.as_str())]) {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Vars {
        Vars {
            name: "ameciclo".into(),
            computer_name: "ameciclo".into(),
            admin_username: "kiln".into(),
            admin_ssh_public_keys: vec!["ssh-ed25519 AAAAC3Nz kiln@example".into()],
            custom_data_path: "out/custom_data.gz".into(),
            managed_identity: false,
            bundle_storage_account: None,
            bundle_container: None,
        }
    }

    #[test]
    fn tfvars_name_only_variables_the_example_declares() {
        let json: serde_json::Value = serde_json::from_str(&vars().to_json().unwrap()).unwrap();
        let declared = FILES[1].1;
        for key in json.as_object().unwrap().keys() {
            assert!(
                declared.contains(&format!("variable \"{key}\"")),
                "{key} is not declared in variables.tf"
            );
        }
    }

    #[test]
    fn no_ssh_key_or_bad_hostname_is_refused() {
        let mut v = vars();
        v.admin_ssh_public_keys.clear();
        assert!(v.validate().unwrap_err().to_string().contains("SSH"));
        let mut v = vars();
        v.computer_name = "under_score".into();
        assert!(v.validate().is_err());
        let mut v = vars();
        v.managed_identity = true;
        assert!(v.validate().unwrap_err().to_string().contains("--account"));
    }
}
