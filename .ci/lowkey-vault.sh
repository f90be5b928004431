# Sourced by .ci/run: fetches Lowkey Vault, the Key Vault emulator the Key Vault tests run the
# daemon against (firstboot/tests/keyvault_emulator.rs), from Maven Central with Maven, into a
# cache keyed by version, and exports where it is.
#
# 3.4.x is the newest line built for Java 17 (the machine's default JDK; 4.x needs 21, 5.x 25).
# When the registry does not serve the jar the tests say SKIPPED and this says why; once the
# jar is here, KILN_REQUIRE_LOWKEY_VAULT=1 makes a missing or broken emulator a test failure.
lowkey_version=3.4.33
lowkey_dir="${XDG_CACHE_HOME:-$HOME/.cache}/kiln/maven/lowkey-vault-app/$lowkey_version"
lowkey_jar="$lowkey_dir/lowkey-vault-app-$lowkey_version.jar"
if [ ! -s "$lowkey_jar" ]; then
  mkdir -p "$lowkey_dir"
  mvn -q -B org.apache.maven.plugins:maven-dependency-plugin:3.6.1:copy \
    -Dartifact="com.github.nagyesta.lowkey-vault:lowkey-vault-app:$lowkey_version:jar" \
    -DoutputDirectory="$lowkey_dir" -Dmdep.overWriteReleases=false >"$lowkey_dir/mvn.log" 2>&1 \
    || echo "lowkey-vault: Maven could not fetch lowkey-vault-app $lowkey_version (log: $lowkey_dir/mvn.log); the Key Vault emulator tests will be SKIPPED"
fi
if [ -s "$lowkey_jar" ]; then
  export KILN_LOWKEY_VAULT_JAR="$lowkey_jar" KILN_REQUIRE_LOWKEY_VAULT=1
  echo "lowkey-vault: $lowkey_jar"
fi
