output "private_ip" {
  description = "VNet address (not reachable from the internet; use the tailnet name)."
  value       = azurerm_network_interface.node.private_ip_address
}

output "vm_id" {
  value = azurerm_linux_virtual_machine.node.id
}

output "nat_egress_ip" {
  description = "The address the node's outbound traffic comes from (for allow-lists)."
  value       = azurerm_public_ip.nat.ip_address
}
