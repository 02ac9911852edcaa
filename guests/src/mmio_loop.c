/* mmio-loop: iters= 32-bit writes to the test device's MMIO register (one exit
 * each), then report the guest TSC cycles per write. */
#include "guest.h"

int main(void)
{
    u64 n = arg_u64("iters", 10000);
    u64 addr = arg_u64("addr", TESTDEV_MMIO);
    uart_init();
    u64 t0 = rdtsc();
    for (u64 i = 0; i < n; i++)
        mmio_write32(addr, (u32)i);
    u64 t1 = rdtsc();
    printf("mmio-loop iters=%lu tsc_per_op=%lu\n", n, n ? (t1 - t0) / n : 0);
    return 0;
}
