/* exit-code: exit through the test-exit port with code= (no console). */
#include "guest.h"

int main(void) { return (int)arg_u64("code", 0); }
