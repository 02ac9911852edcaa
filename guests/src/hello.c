/* hello: the greeting over the UART, then a clean stop. The UART access count is
 * exact and checked by tests: 7 init writes, then one LSR read and one THR write
 * per character. */
#include "guest.h"

int main(void)
{
    uart_init();
    puts("Hello from a pyvmm tiny guest!\n");
    return 0;
}
