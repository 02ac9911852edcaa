/* pci-enum: enumerate bus 0 through mech= (1: ports 0xCF8/0xCFC, 2: ECAM) and print
 * each function in the format of `pyvmm info --machine`; BARs are sized with
 * decoding switched off, as a careful OS does. */
#include "pci.h"

static void print_function(u32 dev, u32 fn)
{
    u32 id = pci_read32(0, dev, fn, 0);
    u32 cls = pci_read32(0, dev, fn, 0x08) >> 8;
    u8 pin = pci_read8(0, dev, fn, 0x3d);
    printf("pci 00:%02x.%u %04x:%04x class=%06x", dev, fn, id & 0xffff, id >> 16, cls);
    if (pin)
        printf(" intx=%c:gsi%u", 'A' + pin - 1, pci_read8(0, dev, fn, 0x3c));
    u16 cmd = pci_read16(0, dev, fn, 0x04);
    pci_write16(0, dev, fn, 0x04, cmd & ~3);
    for (int i = 0; i < 6; i++) {
        int is_io, is64;
        u64 addr = pci_bar_addr(0, dev, fn, i);
        u64 size = pci_bar_size(0, dev, fn, i, &is_io, &is64);
        if (size)
            printf(" bar%d=%s:0x%lx+0x%lx", i, is_io ? "io" : is64 ? "mem64" : "mem", addr, size);
        if (is64)
            i++;
    }
    pci_write16(0, dev, fn, 0x04, cmd);
    printf("\n");
}

int main(void)
{
    uart_init();
    pci_mech = (int)arg_u64("mech", PCI_MECH_ECAM);
    int found = 0;
    for (u32 dev = 0; dev < 32; dev++) {
        if ((pci_read32(0, dev, 0, 0) & 0xffff) == 0xffff)
            continue;
        u32 nfn = (pci_read8(0, dev, 0, 0x0e) & 0x80) ? 8 : 1;
        for (u32 fn = 0; fn < nfn; fn++) {
            if ((pci_read32(0, dev, fn, 0) & 0xffff) == 0xffff)
                continue;
            print_function(dev, fn);
            found++;
        }
    }
    printf("pci-enum done: %d functions\n", found);
    return found ? 0 : 2;
}
