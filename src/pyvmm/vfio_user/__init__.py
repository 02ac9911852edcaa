"""vfio-user: export any pyvmm PCIDevice from its own process to another VMM."""
