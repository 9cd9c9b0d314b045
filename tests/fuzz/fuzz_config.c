/* fuzz_config.c: libFuzzer target for the INI config reader (inih + the key table) and -s
   overrides. Input: the INI text; its first line also goes through kdp_config_set. */
#include <string.h>

#include "fuzz_common.h"
#include "kdpeers/config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  kdp_config c;
  kdp_error err;
  kdp_config_defaults(&c);
  const char *p = fuzz_write(0, data, size, 0);
  if (kdp_config_load_file(&c, p, &err) == 0) {
    (void)kdp_config_validate(&c, &err);
    FILE *null = fopen("/dev/null", "w");
    if (null) {
      kdp_config_print(&c, null); /* every accepted config must print */
      fclose(null);
    }
  }
  char line[512];
  size_t n = size < sizeof line - 1 ? size : sizeof line - 1;
  memcpy(line, data, n);
  line[n] = 0;
  char *nl = strchr(line, '\n');
  if (nl) *nl = 0;
  kdp_config_defaults(&c);
  (void)kdp_config_set(&c, line, &err);
  return 0;
}
