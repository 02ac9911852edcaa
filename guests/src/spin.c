/* spin: never ends on its own (a CPL3 busy loop); for timeouts and vCPU kicks. */
#include "guest.h"

int main(void)
{
    uart_init();
    puts("spinning\n");
    for (;;)
        cpu_relax();
}
