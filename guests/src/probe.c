/* probe: find devices the two ways a PC has. Fixed-resource (ISA) devices are found by
 * probing: write port= a value and read it back, as a driver tells whether a chip is
 * there (a floating bus reads all-ones). Enumerable ones by walking PCI bus 0. Prints
 * what it finds; exits 0. */
#include "pci.h"

int main(void)
{
    uart_init();
    u16 port = (u16)arg_u64("port", 0);
    if (port) {
        u32 before = inl(port);
        outl(port, 0x5a5a0000u | port);
        u32 after = inl(port);
        printf("probe port 0x%x: before=0x%x after=0x%x\n", port, before, after);
    }
    pci_mech = PCI_MECH_ECAM;
    for (u32 dev = 0; dev < 32; dev++) {
        u32 id = pci_read32(0, dev, 0, 0);
        if ((id & 0xffff) == 0xffff)
            continue;
        printf("probe pci 00:%02x.0 %04x:%04x subsys=%04x\n", dev, id & 0xffff, id >> 16,
               pci_read16(0, dev, 0, 0x2e));
    }
    printf("probe done\n");
    return 0;
}
