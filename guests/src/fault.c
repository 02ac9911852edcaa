/* fault: a CPL3 exception (ud2 -> #UD, vector 6) must be reported by the CPL0
 * reporter on the UART and end the VM with test-exit code 0x40 | vector. */
#include "guest.h"

int main(void)
{
    uart_init();
    puts("about to fault\n");
    __asm__ volatile("ud2");
    return 0;
}
