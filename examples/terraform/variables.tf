variable "subscription_id" {
  description = "Azure subscription (or leave null and set ARM_SUBSCRIPTION_ID)."
  type        = string
  default     = null
}

variable "resource_group_name" {
  type    = string
  default = "kiln"
}

variable "location" {
  type    = string
  default = "westeurope"
}

variable "name" {
  description = "Azure resource name of the VM (and prefix of its network resources)."
  type        = string
}

variable "computer_name" {
  description = "Guest hostname; kiln uses the profile's node.hostname."
  type        = string
}

variable "vm_size" {
  description = "2 vCPU / 8 GiB burstable AMD: enough for K3s + Argo CD + the Tailscale operator."
  type        = string
  default     = "Standard_B2as_v2"
}

variable "os_disk_size_gb" {
  type    = number
  default = 64
}

variable "vnet_cidr" {
  type    = string
  default = "10.60.0.0/16"
}

variable "subnet_cidr" {
  type    = string
  default = "10.60.1.0/24"
}

variable "admin_username" {
  type = string
}

variable "admin_ssh_public_keys" {
  description = "At least one; SSH is reachable only over the tailnet."
  type        = list(string)
  validation {
    condition     = length(var.admin_ssh_public_keys) > 0
    error_message = "Give at least one SSH public key."
  }
}

variable "custom_data_path" {
  description = "custom_data.gz written by `kiln publish` (url delivery)."
  type        = string
}

variable "managed_identity" {
  description = "Give the VM a system-assigned identity with read access to the bundle container."
  type        = bool
  default     = false
}

variable "bundle_storage_account" {
  description = "Storage account `kiln publish --account` used (only with managed_identity)."
  type        = string
  default     = ""
}

variable "bundle_storage_resource_group" {
  type    = string
  default = ""
}

variable "bundle_container" {
  type    = string
  default = "kiln"
}
