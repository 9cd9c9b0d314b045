/* version.c: the git commit kdpeers was built from (meson's vcs_tag writes git_hash.h). */
#include "git_hash.h"
#include "kdpeers/common.h"

const char *kdp_git_hash(void) { return KDP_GIT_HASH; }
