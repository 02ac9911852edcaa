/* echo: read bytes from the UART (polling LSR.DR) and write them back upper-cased,
 * until a newline; then exit with the number of bytes read as the exit code. */
#include "guest.h"

int main(void)
{
    uart_init();
    puts("echo ready\n");
    u32 n = 0;
    for (;;) {
        while (!(inb(COM1_BASE + 5) & 0x01))
            cpu_relax();
        char c = (char)inb(COM1_BASE);
        n++;
        if (c >= 'a' && c <= 'z')
            c = (char)(c - 'a' + 'A');
        putc(c);
        if (c == '\n')
            break;
    }
    return (int)(n & 0x3f);
}
