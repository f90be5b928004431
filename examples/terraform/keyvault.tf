# Secrets out of custom_data: the node reads its secrets (Tailscale auth key, operator OAuth
# client secret, GitOps repo token) from this Key Vault with its user-assigned managed identity.
# The profile names them as {azure-key-vault: {vault: NAME, secret: NAME}} and sets
# managed-identity.client-id to the identity's client id (output identity_client_id);
# custom_data then carries references only. Flow and failure messages: docs/keyvault.md.
#
# The secret values are not in this configuration (they would land in the Terraform state):
# set them once with `az keyvault secret set --vault-name VAULT --name NAME --file FILE`.

data "azurerm_client_config" "current" {}

variable "key_vault_name" {
  description = "Globally unique vault name (3-24 letters, digits, -); default NAME-kv."
  type        = string
  default     = null
}

locals {
  key_vault_name = coalesce(var.key_vault_name, "${var.name}-kv")
}

# A user-assigned identity outlives the VM: a rebuilt node gets the same identity, so the
# vault's role assignment and the profile's client id stay valid across re-creates.
resource "azurerm_user_assigned_identity" "node" {
  name                = "${var.name}-id"
  location            = azurerm_resource_group.kiln.location
  resource_group_name = azurerm_resource_group.kiln.name
}

# RBAC mode: access is granted with Azure role assignments, not vault access policies.
resource "azurerm_key_vault" "kiln" {
  name                       = local.key_vault_name
  location                   = azurerm_resource_group.kiln.location
  resource_group_name        = azurerm_resource_group.kiln.name
  tenant_id                  = data.azurerm_client_config.current.tenant_id
  sku_name                   = "standard"
  enable_rbac_authorization  = true
  purge_protection_enabled   = true
  soft_delete_retention_days = 7
}

# The node may read secret values, nothing else (no list, no write).
resource "azurerm_role_assignment" "node_secrets_user" {
  scope                = azurerm_key_vault.kiln.id
  role_definition_name = "Key Vault Secrets User"
  principal_id         = azurerm_user_assigned_identity.node.principal_id
}

# Whoever runs Terraform may set the secrets (az keyvault secret set).
resource "azurerm_role_assignment" "operator_secrets_officer" {
  scope                = azurerm_key_vault.kiln.id
  role_definition_name = "Key Vault Secrets Officer"
  principal_id         = data.azurerm_client_config.current.object_id
}

output "identity_client_id" {
  description = "managed-identity.client-id for the profile."
  value       = azurerm_user_assigned_identity.node.client_id
}

output "key_vault_name" {
  description = "The vault the profile's azure-key-vault references name."
  value       = azurerm_key_vault.kiln.name
}

output "key_vault_uri" {
  value = azurerm_key_vault.kiln.vault_uri
}
