# kiln on Azure: one Ubuntu 22.04 VM on a private VNet, no public IP, reached only through
# Tailscale. The VM builds itself from custom_data.gz written by `kiln publish`; its bootstrap
# downloads the bundle from Blob Storage with a read-only SAS URL and checks its sha256.
#
# Egress: new Azure subnets no longer get "default outbound access", and the VM has no public IP,
# so a NAT gateway gives it outbound internet (K3s/Tailscale/Argo CD downloads, the bundle blob,
# the Tailscale control plane). Nothing is reachable inbound: the NSG has no allow rule from the
# internet; Tailscale works with outbound connections only.

terraform {
  required_version = ">= 1.5"
  required_providers {
    azurerm = {
      source  = "hashicorp/azurerm"
      version = "~> 4.0"
    }
  }
}

# azurerm 4.x needs the subscription: set ARM_SUBSCRIPTION_ID or var.subscription_id.
provider "azurerm" {
  features {}
  subscription_id = var.subscription_id
}

resource "azurerm_resource_group" "kiln" {
  name     = var.resource_group_name
  location = var.location
}

resource "azurerm_virtual_network" "kiln" {
  name                = "${var.name}-vnet"
  location            = azurerm_resource_group.kiln.location
  resource_group_name = azurerm_resource_group.kiln.name
  address_space       = [var.vnet_cidr]
}

resource "azurerm_subnet" "nodes" {
  name                            = "nodes"
  resource_group_name             = azurerm_resource_group.kiln.name
  virtual_network_name            = azurerm_virtual_network.kiln.name
  address_prefixes                = [var.subnet_cidr]
  default_outbound_access_enabled = false
}

resource "azurerm_public_ip" "nat" {
  name                = "${var.name}-nat-ip"
  location            = azurerm_resource_group.kiln.location
  resource_group_name = azurerm_resource_group.kiln.name
  allocation_method   = "Static"
  sku                 = "Standard"
}

resource "azurerm_nat_gateway" "kiln" {
  name                = "${var.name}-nat"
  location            = azurerm_resource_group.kiln.location
  resource_group_name = azurerm_resource_group.kiln.name
  sku_name            = "Standard"
}

resource "azurerm_nat_gateway_public_ip_association" "kiln" {
  nat_gateway_id       = azurerm_nat_gateway.kiln.id
  public_ip_address_id = azurerm_public_ip.nat.id
}

resource "azurerm_subnet_nat_gateway_association" "nodes" {
  subnet_id      = azurerm_subnet.nodes.id
  nat_gateway_id = azurerm_nat_gateway.kiln.id
}

# No inbound allow rules: Azure's defaults deny inbound from the internet and allow outbound.
resource "azurerm_network_security_group" "nodes" {
  name                = "${var.name}-nsg"
  location            = azurerm_resource_group.kiln.location
  resource_group_name = azurerm_resource_group.kiln.name
}

resource "azurerm_subnet_network_security_group_association" "nodes" {
  subnet_id                 = azurerm_subnet.nodes.id
  network_security_group_id = azurerm_network_security_group.nodes.id
}

# A private address only: no public_ip_address_id.
resource "azurerm_network_interface" "node" {
  name                = "${var.name}-nic"
  location            = azurerm_resource_group.kiln.location
  resource_group_name = azurerm_resource_group.kiln.name

  ip_configuration {
    name                          = "internal"
    subnet_id                     = azurerm_subnet.nodes.id
    private_ip_address_allocation = "Dynamic"
  }
}

resource "azurerm_linux_virtual_machine" "node" {
  name                  = var.name
  computer_name         = var.computer_name
  location              = azurerm_resource_group.kiln.location
  resource_group_name   = azurerm_resource_group.kiln.name
  size                  = var.vm_size
  network_interface_ids = [azurerm_network_interface.node.id]

  admin_username                  = var.admin_username
  disable_password_authentication = true
  dynamic "admin_ssh_key" {
    for_each = var.admin_ssh_public_keys
    content {
      username   = var.admin_username
      public_key = admin_ssh_key.value
    }
  }

  # Exactly what `kiln publish` wrote: gzip'd #cloud-config, base64-encoded once by filebase64.
  custom_data = filebase64(var.custom_data_path)

  source_image_reference {
    publisher = "Canonical"
    offer     = "0001-com-ubuntu-server-jammy"
    sku       = "22_04-lts-gen2"
    version   = "latest"
  }

  os_disk {
    caching              = "ReadWrite"
    storage_account_type = "StandardSSD_LRS"
    disk_size_gb         = var.os_disk_size_gb
  }

  # Serial console and boot diagnostics without a public IP (managed storage account).
  boot_diagnostics {}

  # The user-assigned identity reads the node's secrets from Key Vault (keyvault.tf); the
  # optional system-assigned one reads the bundle container.
  identity {
    type         = var.managed_identity ? "SystemAssigned, UserAssigned" : "UserAssigned"
    identity_ids = [azurerm_user_assigned_identity.node.id]
  }

  # The node reads its secrets on first boot: the role must exist before it boots (Azure
  # still takes minutes to propagate a new assignment; a 403 then is retried by restarting
  # kiln-firstboot, which resumes at the failed step).
  depends_on = [azurerm_role_assignment.node_secrets_user]

  # custom_data is read only at provisioning; changing it means rebuilding the node, which kiln
  # supports by design (same profile → same payload). Keep Terraform from doing it silently.
  lifecycle {
    ignore_changes = [custom_data]
  }
}

# Optional: let the VM's identity read the bundle container (for tooling on the node; the kiln
# bootstrap itself uses the SAS URL baked into custom_data and needs no identity).
data "azurerm_storage_account" "bundles" {
  count               = var.managed_identity ? 1 : 0
  name                = var.bundle_storage_account
  resource_group_name = var.bundle_storage_resource_group
}

resource "azurerm_role_assignment" "bundle_reader" {
  count                = var.managed_identity ? 1 : 0
  scope                = "${data.azurerm_storage_account.bundles[0].id}/blobServices/default/containers/${var.bundle_container}"
  role_definition_name = "Storage Blob Data Reader"
  principal_id         = azurerm_linux_virtual_machine.node.identity[0].principal_id
}
