/* pio-loop: iters= port writes to the UART scratch register (one exit each), then
 * report the guest TSC cycles per write. */
#include "guest.h"

int main(void)
{
    u64 n = arg_u64("iters", 10000);
    u16 port = (u16)arg_u64("port", COM1_BASE + 7);
    uart_init();
    u64 t0 = rdtsc();
    for (u64 i = 0; i < n; i++)
        outb(port, (u8)i);
    u64 t1 = rdtsc();
    printf("pio-loop iters=%lu tsc_per_op=%lu\n", n, n ? (t1 - t0) / n : 0);
    return 0;
}
