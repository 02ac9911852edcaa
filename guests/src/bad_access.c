/* bad-access: accesses nothing claims — a PIO write and read, an MMIO write and
 * read in a hole — must be counted by the VMM and the guest must go on. Exits with
 * code= (default 0x21) so the test sees it got past them. */
#include "guest.h"

int main(void)
{
    uart_init();
    outb(0x2f0, 0x5a);                       /* unclaimed port write */
    u8 v = inb(0x2f0);                       /* unclaimed port read: all-ones */
    mmio_write32(0xd0000000UL, 0xdeadbeef);  /* MMIO hole write */
    u32 m = mmio_read32(0xd0000000UL);       /* MMIO hole read */
    printf("bad-access pio=%x mmio=%x\n", v, m);
    if (v != 0xff)
        fail("unclaimed port read %x, want ff", v);
    return (int)arg_u64("code", 0x21);
}
