// kiln on Azure with Pulumi: one Ubuntu 22.04 VM on a private VNet, no public IP, reached only
// through Tailscale. The VM builds itself from out/custom_data.gz (`kiln build` or
// `kiln publish`), passed as osProfile.customData: the gzip bytes, base64-encoded exactly once.
//
// The same resources as examples/terraform, plus the Key Vault flow (docs/azure.md): a
// user-assigned managed identity attached to the VM, a Key Vault in RBAC mode, and role
// assignments so the node reads its secrets (Key Vault Secrets User on the vault) and the
// bundle (Storage Blob Data Reader on the bundle container) with that identity.
//
// Egress: new Azure subnets get no "default outbound access" and the VM has no public IP, so a
// NAT gateway gives it outbound internet. Nothing is reachable inbound.
//
// Per-module imports (`@pulumi/azure-native/compute`, ...) instead of the package root: the same
// API, and `tsc` (and `pulumi up`) load only these modules' types, not all 270 of them.
import * as fs from "fs";
import * as pulumi from "@pulumi/pulumi";
import * as authorization from "@pulumi/azure-native/authorization";
import * as compute from "@pulumi/azure-native/compute";
import * as keyvault from "@pulumi/azure-native/keyvault";
import * as managedidentity from "@pulumi/azure-native/managedidentity";
import * as network from "@pulumi/azure-native/network";
import * as resources from "@pulumi/azure-native/resources";

const config = new pulumi.Config();
/** Azure resource name of the VM and prefix of its other resources. */
const name = config.get("name") ?? "ameciclo";
/** Guest hostname: the profile's node.hostname. */
const computerName = config.get("computerName") ?? name;
const vmSize = config.get("vmSize") ?? "Standard_B2as_v2";
const osDiskSizeGb = config.getNumber("osDiskSizeGb") ?? 64;
const vnetCidr = config.get("vnetCidr") ?? "10.60.0.0/16";
const subnetCidr = config.get("subnetCidr") ?? "10.60.1.0/24";
const adminUsername = config.require("adminUsername");
/** At least one; SSH is reachable only over the tailnet. */
const adminSshPublicKeys = config.requireObject<string[]>("adminSshPublicKeys");
if (adminSshPublicKeys.length === 0) {
  throw new Error("adminSshPublicKeys: give at least one SSH public key");
}
/** What `kiln build`/`kiln publish` wrote. */
const customDataPath = config.get("customDataPath") ?? "../../out/custom_data.gz";
/** The Key Vault kiln's profile names in its `{azure-key-vault: {vault: ...}}` references. */
const vaultName = config.get("vaultName") ?? `${name}-kv`;
/** Where `kiln publish --account/--container` put the bundle (an existing storage account). */
const bundleStorageAccount = config.require("bundleStorageAccount");
const bundleStorageResourceGroup = config.require("bundleStorageResourceGroup");
const bundleContainer = config.get("bundleContainer") ?? "kiln";

const tags: Record<string, string> = {
  "managed-by": "pulumi",
  "kiln-node": computerName,
  ...(config.getObject<Record<string, string>>("tags") ?? {}),
};

// Read once, base64 once: customData is the base64 of the gzip file's bytes. cloud-init
// recognises gzip by its magic bytes; Azure allows 65,535 bytes before encoding, which
// `kiln build` already enforces.
const customData = fs.readFileSync(customDataPath).toString("base64");

// Built-in role definition ids (the same in every Azure cloud).
const KEY_VAULT_SECRETS_USER = "4633458b-17de-408a-b874-0445c86b69e6";
const STORAGE_BLOB_DATA_READER = "2a2b9908-6ea1-4ae2-8e65-a410df84e7d1";

const client = authorization.getClientConfigOutput();
const roleDefinition = (id: string) =>
  pulumi.interpolate`/subscriptions/${client.subscriptionId}/providers/Microsoft.Authorization/roleDefinitions/${id}`;

const rg = new resources.ResourceGroup("kiln", {
  resourceGroupName: config.get("resourceGroupName") ?? "kiln",
  tags,
});

// --- Network: private subnet, NAT egress, no inbound rule ----------------------------------

const natIp = new network.PublicIPAddress("nat-ip", {
  resourceGroupName: rg.name,
  publicIpAddressName: `${name}-nat-ip`,
  sku: { name: network.PublicIPAddressSkuName.Standard },
  publicIPAllocationMethod: network.IPAllocationMethod.Static,
  tags,
});

const nat = new network.NatGateway("nat", {
  resourceGroupName: rg.name,
  natGatewayName: `${name}-nat`,
  sku: { name: network.NatGatewaySkuName.Standard },
  publicIpAddresses: [{ id: natIp.id }],
  tags,
});

// No security rules: Azure's default rules deny inbound from the internet and allow outbound;
// Tailscale needs outbound connections only.
const nsg = new network.NetworkSecurityGroup("nsg", {
  resourceGroupName: rg.name,
  networkSecurityGroupName: `${name}-nsg`,
  tags,
});

const vnet = new network.VirtualNetwork("vnet", {
  resourceGroupName: rg.name,
  virtualNetworkName: `${name}-vnet`,
  addressSpace: { addressPrefixes: [vnetCidr] },
  tags,
});

const subnet = new network.Subnet("nodes", {
  resourceGroupName: rg.name,
  virtualNetworkName: vnet.name,
  subnetName: "nodes",
  addressPrefix: subnetCidr,
  defaultOutboundAccess: false,
  natGateway: { id: nat.id },
  networkSecurityGroup: { id: nsg.id },
});

// A private address only: no publicIPAddress on the ip configuration.
const nic = new network.NetworkInterface("nic", {
  resourceGroupName: rg.name,
  networkInterfaceName: `${name}-nic`,
  ipConfigurations: [
    {
      name: "internal",
      subnet: { id: subnet.id },
      privateIPAllocationMethod: network.IPAllocationMethod.Dynamic,
    },
  ],
  tags,
});

// --- Identity, Key Vault, role assignments ---------------------------------------------------

// User-assigned rather than system-assigned: it exists before the VM, so the role assignments
// below can be in place (and propagating) before the node's first boot asks for a token, and a
// rebuilt VM keeps the same identity and grants. The profile names it by `client-id`.
const identity = new managedidentity.UserAssignedIdentity("node", {
  resourceGroupName: rg.name,
  resourceName: `${name}-id`,
  tags,
});

// RBAC mode: data-plane access is granted by role assignments, not access policies.
const vault = new keyvault.Vault("kv", {
  resourceGroupName: rg.name,
  vaultName,
  properties: {
    tenantId: client.tenantId,
    sku: { family: keyvault.SkuFamily.A, name: keyvault.SkuName.Standard },
    enableRbacAuthorization: true,
    enableSoftDelete: true,
    softDeleteRetentionInDays: 90,
    enablePurgeProtection: true,
  },
  tags,
});

// Read secrets only (get), nothing else: the node never writes to the vault.
const secretsUser = new authorization.RoleAssignment("kv-secrets-user", {
  scope: vault.id,
  principalId: identity.principalId,
  principalType: authorization.PrincipalType.ServicePrincipal,
  roleDefinitionId: roleDefinition(KEY_VAULT_SECRETS_USER),
});

// Scoped to the one container `kiln publish` writes to, not the whole account.
const bundleContainerScope = pulumi.interpolate`/subscriptions/${client.subscriptionId}/resourceGroups/${bundleStorageResourceGroup}/providers/Microsoft.Storage/storageAccounts/${bundleStorageAccount}/blobServices/default/containers/${bundleContainer}`;
const bundleReader = new authorization.RoleAssignment("bundle-reader", {
  scope: bundleContainerScope,
  principalId: identity.principalId,
  principalType: authorization.PrincipalType.ServicePrincipal,
  roleDefinitionId: roleDefinition(STORAGE_BLOB_DATA_READER),
});

// --- The VM -------------------------------------------------------------------------------

const vm = new compute.VirtualMachine(
  "node",
  {
    resourceGroupName: rg.name,
    vmName: name,
    hardwareProfile: { vmSize },
    identity: {
      type: compute.ResourceIdentityType.UserAssigned,
      userAssignedIdentities: [identity.id],
    },
    networkProfile: { networkInterfaces: [{ id: nic.id, primary: true }] },
    osProfile: {
      computerName,
      adminUsername,
      customData,
      linuxConfiguration: {
        disablePasswordAuthentication: true,
        ssh: {
          publicKeys: adminSshPublicKeys.map((keyData) => ({
            path: `/home/${adminUsername}/.ssh/authorized_keys`,
            keyData,
          })),
        },
      },
    },
    storageProfile: {
      imageReference: {
        publisher: "Canonical",
        offer: "0001-com-ubuntu-server-jammy",
        sku: "22_04-lts-gen2",
        version: "latest",
      },
      osDisk: {
        createOption: compute.DiskCreateOptionTypes.FromImage,
        caching: compute.CachingTypes.ReadWrite,
        diskSizeGB: osDiskSizeGb,
        managedDisk: { storageAccountType: compute.StorageAccountTypes.StandardSSD_LRS },
      },
    },
    // The serial log (kiln's milestones, docs/azure.md "First real boot") without a public IP:
    // boot diagnostics with a managed storage account (no storageUri).
    diagnosticsProfile: { bootDiagnostics: { enabled: true } },
    tags,
  },
  {
    // Grants first, so the first boot's token already carries them (they still take minutes
    // to propagate; the daemon retries "identity not found" and 403 is reported, see the runbook).
    dependsOn: [secretsUser, bundleReader],
    // customData is read only at provisioning; a new payload means rebuilding the node
    // (same profile, same payload: docs/rebuild.md). Keep `pulumi up` from doing it silently.
    ignoreChanges: ["osProfile.customData"],
  },
);

export const vmId = vm.id;
/** VNet address (not reachable from the internet; use the tailnet name). */
export const privateIp = nic.ipConfigurations.apply((c) => c?.[0]?.privateIPAddress);
/** The address the node's outbound traffic comes from (for allow-lists). */
export const natEgressIp = natIp.ipAddress;
/** For the profile's Key Vault references: the vault's URL and the identity's client id. */
export const vaultUri = vault.properties.apply((p) => p.vaultUri);
export const identityClientId = identity.clientId;
