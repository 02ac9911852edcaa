/* pci-shmbar: the PCI test device's BAR4 is shared memory the VMM maps into the guest
 * (a KVM memslot): the guest writes and reads it at native speed with no exit, the
 * device sees the same bytes (SHM_SUM), writes the guest can read (SHM_FILL), and
 * counts 0 trapped BAR4 accesses (SHM_TRAPS). Moving the BAR moves the mapping: the
 * data appears at the new address, the old one decodes nothing. n= rounds of a 1 MiB
 * write+read sweep, to show the accesses cost no exits. dev= the slot (default 1; the
 * device served through the vfio-user client sits in a later one). */
#include "pci.h"

static u32 DEV = 1;
#define R(off) (bar0 + (off))

static u64 bar0;

static void check(int cond, const char *what)
{
    if (!cond)
        fail("%s", what);
    printf("ok %s\n", what);
}

int main(void)
{
    uart_init();
    u64 rounds = arg_u64("n", 4);
    DEV = (u32)arg_u64("dev", 1);
    check((pci_read32(0, DEV, 0, 0)) == 0x50501234, "testdev present");
    bar0 = pci_bar_addr(0, DEV, 0, 0);
    u64 bar4 = pci_bar_addr(0, DEV, 0, 4);
    check(bar4 != 0, "BAR4 assigned");
    volatile u8 *shm = (volatile u8 *)bar4;
    volatile u64 *shm64 = (volatile u64 *)bar4;
    u32 sum = 0;
    for (u32 i = 0; i < 4096; i++) {
        shm[i] = (u8)(i * 13 + 5);
        sum += (u8)(i * 13 + 5);
    }
    check(mmio_read32(R(0x60)) == sum, "device sees the guest's writes (SHM_SUM)");
    mmio_write32(R(0x64), 0xA5);
    int filled = 1;
    for (u32 i = 0; i < 4096; i++)
        filled &= shm[i] == 0xA5;
    check(filled, "guest sees the device's writes (SHM_FILL)");
    u64 t0 = rdtsc(), acc = 0;
    for (u64 r = 0; r < rounds; r++)
        for (u32 i = 0; i < (1u << 20) / 8; i++) {
            shm64[i] = i ^ r;
            acc += shm64[i];
        }
    u64 cycles = rdtsc() - t0;
    check(mmio_read32(R(0x68)) == 0, "no BAR4 access was trapped (SHM_TRAPS 0)");
    printf("shm sweep: %lu MiB written and read in %lu cycles (acc %lx)\n",
           rounds, cycles, acc);

    /* Move BAR4 (64-bit: low and high dwords) with decoding off, then on again. */
    u16 cmd = pci_read16(0, DEV, 0, 4);
    pci_write16(0, DEV, 0, 4, cmd & ~2);
    u64 moved = bar4 + (16u << 20);
    pci_write32(0, DEV, 0, 0x20, (u32)moved | 0xc);
    pci_write32(0, DEV, 0, 0x24, (u32)(moved >> 32));
    pci_write16(0, DEV, 0, 4, cmd | 2);
    bar0 = pci_bar_addr(0, DEV, 0, 0);
    volatile u64 *at = (volatile u64 *)moved;
    check(at[7] == (7 ^ (rounds - 1)), "data follows the moved BAR4");
    check(*(volatile u32 *)bar4 == 0xffffffff, "old BAR4 address decodes nothing");
    check(mmio_read32(R(0x68)) == 0, "still no trapped BAR4 access");
    printf("pci-shmbar: all passed\n");
    return 0;
}
