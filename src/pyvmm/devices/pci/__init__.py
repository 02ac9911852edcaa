"""PCI: config space, BARs, capabilities (MSI, MSI-X), the root with its CF8/CFC and
ECAM front ends."""
